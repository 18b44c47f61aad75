"""Kubernetes discovery: where to ship (the receiver Service's ClusterIP and port) and with which client
certificate (a Secret, written to files for the TLS layer).

audit-forwarder polled both once a minute, took any API error as "service gone" and killed forwarding, and
restarted fluent-bit with SIGKILL on every certificate change (shared/reference/audit-forwarder.md, losses
2, 6 and 7). Here each object is followed with list + watch:

- list (``fieldSelector=metadata.name=...``), then watch from the list's resourceVersion; when a watch ends
  (the server's ``timeoutSeconds``) it is resumed from the last resourceVersion seen; on 410 Gone (an ERROR
  event or the HTTP status) the object is listed again.
- API trouble (unreachable, 5xx, 401/403, garbage) never changes what we ship to: the last target and the
  last certificate files stay, errors are logged at a sane rate and retried with capped exponential backoff.
- Only an answer from the API that the Service is gone (a DELETED event, an empty list or a 404) pauses
  shipping (``on_target(None)``); the backlog stays in the log file.
- Secret material is written atomically (temp file in the directory, 0600, fsync, rename) and only when it
  changed, so the TLS layer sees either the old or the new file, never half a file.
- The kubeconfig is re-read when its file changes (inode, mtime, size): the API client is rebuilt and the
  watches restart against whatever it points at now.

kubernetes_asyncio is imported lazily, inside functions: ``import pyforward.discovery`` stays cheap and a
static destination never loads it.

Split by concern: `follow` (Discovery: the client's lifecycle, the state and the callbacks), `kubeconfig` (which
configuration, the API client made from it, its changes), `watch` (one object followed by list + watch), `service`
(the Service -> Target), `secret` (the Secret -> files), `errors` (API errors in one line), `pacing` (rate-limited
error lines, backoff).
"""

from pyforward.discovery.follow import Discovery
from pyforward.discovery.service import Target

__all__ = ["Discovery", "Target"]
