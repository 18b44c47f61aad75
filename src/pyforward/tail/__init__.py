"""Read every line of a log that kube-apiserver rotates by rename, across restarts, in order, once.

Pull-based: the shipper asks for a batch when it has room for one (`read_batch`), and waits (`wait`) when
the tailer is caught up. The file is the buffer: nothing is read ahead beyond one `read_size` chunk plus
one partial line of at most `max_line_bytes`, whatever the backlog (fluent-bit #3988, #8908: in_tail
memory grows until OOMKilled).

Rotation (lumberjack, used by kube-apiserver): close `audit.log`, rename it to
`audit-2026-11-26T12-00-00.000.log`, optionally gzip that to `...log.gz` (new inode, then the plain file is
deleted), create a new `audit.log`, delete backups beyond a count. Hence:

* A rotated file stays open (fd) until read to its end, even if it is deleted meanwhile; fluent-bit instead
  closes it after Rotate_Wait whatever is left (#2110, #1108: lines lost when files rotate quickly).
* Files are read strictly in order: the current one to its end, then every rotated sibling newer than it
  (oldest first), then the live file, also when rotations outpace the reader or happened while pyforward
  was down (fluent-bit #1330 re-reads such a file; audit-forwarder never read rotated files at all).
* A file is recognised by (dev, inode) plus a fingerprint of its first bytes (inodes are reused); a `.gz`
  backup by the fingerprint of its decompressed head alone. Offsets in a `.gz` are into the decompressed
  data, so a checkpoint taken in `audit-X.log` stays valid once that becomes `audit-X.log.gz`.

* A backup deleted (by lumberjack's retention) before it was read is a loss: logged once at ERROR with its size
  and counted (issue 12); so is a checkpointed file gone at start, but only once a look that lumberjack's
  concurrent renames, gzips and deletes cannot fool says so. The spool (issue 21) gives every backup not yet
  passed by a written checkpoint a second name, so that the retention deletes only its own.

Split by concern, as fluent-bit's in_tail is: `scan` (lumberjack names, listing rotated siblings), `file` (one open
file, its identity, reading plain and gzip), `lines` (buffers into lines), `watch` (inotify and polling), `ledger`
(which backups exist, which were lost), `spool` (hard links that keep unshipped backups from the API server's
retention, under a disk guard: issue 21) and `spooled` (the Tailer's side of it), `looks` (a listing when a backup
name changes), `start` (where reading starts: the checkpointed file or start_at), `rotate` (the file being read
rotated away or truncated), `tailer` (the Tailer that composes them), `types` (what they share, below all of them:
LineBatch, TailerStats, Problems).
"""

from pyforward.tail.tailer import LineBatch, Tailer, TailerStats

__all__ = ["LineBatch", "Tailer", "TailerStats"]
