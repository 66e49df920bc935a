package healthcheck

import (
	"os"
	"time"
)

// How long what the package keeps about an upstream outlives the configs
// that use it. Both are fixed; the environment variables exist for the
// integration tests only (a real deployment has no reason to set them,
// and the syncer logs a warning when they are set).
var (
	// forgetAfter is how long a record outlives its last use by a config
	// (Expire): long enough that a reload which briefly drops an
	// upstream keeps its state and counters, short enough that a churn
	// of addresses (autoscaling, dynamic upstreams) does not pile up.
	forgetAfter = envDuration(forgetAfterEnv, 10*time.Minute)
	// stateGrace is how long an operator state stays in storage after
	// the last use of its upstream by any instance sharing the storage
	// (Syncer): a state set for an address last week is not applied to
	// an unrelated upstream that reuses the address today.
	stateGrace = envDuration(stateGraceEnv, 24*time.Hour)
	// seenRefresh is how stale a stored record's seen may get before an
	// instance using the upstream writes it again: a write every few
	// minutes per upstream, not every round.
	seenRefresh = min(5*time.Minute, stateGrace/8)
)

// The test-only overrides of forgetAfter and stateGrace (Go durations).
const (
	forgetAfterEnv = "CADDY_AFFINITY_TEST_FORGET_AFTER"
	stateGraceEnv  = "CADDY_AFFINITY_TEST_STATE_GRACE"
)

func envDuration(name string, def time.Duration) time.Duration {
	if d, err := time.ParseDuration(os.Getenv(name)); err == nil && d > 0 {
		return d
	}
	return def
}

// lastUse is when some instance last used the stored record's upstream,
// as far as storage knows: its seen, or for a record written before
// seen existed (or set on an upstream no config used), when its state
// was set.
func (rec storedRecord) lastUse() int64 { return max(rec.Seen, rec.Since) }

// fresh reports whether a stored record was used within stateGrace of
// now, and so may be applied.
func fresh(rec storedRecord, now time.Time) bool {
	return now.UnixNano()-rec.lastUse() <= int64(stateGrace)
}
