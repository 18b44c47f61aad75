from tests.harness import *
def test_smoke(harness):
    r = harness.receiver("mtls")
    w = harness.audit_log(max_bytes=64<<10)
    run = harness.run(harness.run_env(r))
    ids = w.write(2000)
    out = r.received()
    harness.wait_delivered(ids, out, run=run)
    print(w.rotations, run.logs()[:5])
    assert run.terminate() == 0
    assert_delivered(w.ids, out.refresh())
