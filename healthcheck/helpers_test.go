package healthcheck

import (
	"context"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

// testInstance is one simulated Caddy instance: its own registry (the
// process-wide one in production) with observed logs.
type testInstance struct {
	name string
	reg  *registry
	logs *observer.ObservedLogs
}

func newInstance(t *testing.T, name string) *testInstance {
	t.Helper()
	core, logs := observer.New(zap.DebugLevel)
	logger := zap.New(core)
	reg := newRegistry(func() string { return name }, func() *zap.Logger { return logger })
	return &testInstance{name: name, reg: reg, logs: logs}
}

// post applies an operator's state change through this instance, as the
// admin API's POST /affinity/upstreams/state does.
func (in *testInstance) post(t *testing.T, dial string, s State) error {
	t.Helper()
	_, err := in.reg.operateDial(context.Background(), dial, s)
	return err
}

// stateChanges returns the logged state changes for an upstream.
func (in *testInstance) stateChanges(dial string) []map[string]any {
	var out []map[string]any
	for _, e := range in.logs.FilterMessageSnippet("upstream state").All() {
		m := e.ContextMap()
		if m["upstream"] == dial {
			out = append(out, m)
		}
	}
	return out
}

// waitLastChange waits until the last logged state change of dial has
// the given reason: a change is logged just after the state is set, by
// the goroutine that set it, so a test that saw the state may not see the
// log line yet.
func (in *testInstance) waitLastChange(t *testing.T, dial, reason string) {
	t.Helper()
	waitFor(t, time.Second, "the last state change of "+dial+" logged with reason "+reason, func() bool {
		c := in.stateChanges(dial)
		return len(c) > 0 && c[len(c)-1]["reason"] == reason
	})
}

// waitFor polls cond every 5ms until it holds or timeout passes, and
// returns how long it took.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > timeout {
			t.Fatalf("after %s: %s", timeout, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
	return time.Since(start)
}
