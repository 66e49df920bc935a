package healthcheck

import (
	"slices"
	"sync"
	"time"

	"go.uber.org/zap"
)

// What the two ways of sharing operator states (Syncer through Caddy
// storage, RedisStates through Redis) have in common: the values their
// users hand in, the rule of what to write back, and how a round's
// outcome is logged.

// holds are the values (a storage, a client) that the users of one
// shared syncer handed in, the newest last: a reload hands in its own
// before the old config lets go of its, and the syncer uses the newest
// still held. Pointers, so that two users handing in equal values are
// told apart.
type holds[T any] struct {
	mu   sync.Mutex
	held []*T
}

func (h *holds[T]) add(v *T) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.held = append(h.held, v)
}

func (h *holds[T]) remove(v *T) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if i := slices.Index(h.held, v); i >= 0 {
		h.held = slices.Delete(h.held, i, i+1)
	}
}

// newest returns the newest value still held, or nil.
func (h *holds[T]) newest() *T {
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.held) == 0 {
		return nil
	}
	return h.held[len(h.held)-1]
}

// writeBack says what a round writes for an upstream used here, given
// the shared record (stored: there is one): the operator state known
// here when the shared one is older or missing, the shared record again
// when only its seen stamp is seenRefresh stale, or nothing (ok false).
// seen is the stamp to write with it.
func writeBack(u *Upstream, rec storedRecord, stored bool) (write operatorRecord, seen int64, ok bool) {
	seen = u.seen.Load()
	switch op := u.operator.Load(); {
	case op != nil && (!stored || rec.Since < op.Since):
		write = *op
	case stored && seen-rec.Seen >= int64(seenRefresh):
		write = rec.operatorRecord // only seen is new
	default:
		return operatorRecord{}, 0, false
	}
	return write, max(seen, rec.Seen), true
}

// usedWithinGrace reports whether a config here used u within stateGrace:
// one kept only for its live sessions has no use to vouch for, nor a
// state to write back.
func usedWithinGrace(u *Upstream, now time.Time) bool {
	return now.UnixNano()-u.seen.Load() <= int64(stateGrace)
}

// logStaleDeleted logs the deletion of a shared record no instance has
// used for stateGrace.
func logStaleDeleted(l *zap.Logger, rec storedRecord) {
	l.Info("deleted the stored state of an upstream no instance has used",
		zap.String("upstream", rec.Upstream), zap.String("state", rec.State.String()),
		zap.Time("last_used", time.Unix(0, rec.lastUse())), zap.Duration("grace", stateGrace))
}

// roundOutcome logs a sync round's outcome when it changes: a store that
// stays unreachable is logged once, not every round. where names the
// store ("storage", "Redis").
type roundOutcome struct{ lastErr string }

func (o *roundOutcome) log(l *zap.Logger, where string, interval time.Duration, err error) {
	switch {
	case err != nil && err.Error() != o.lastErr:
		o.lastErr = err.Error()
		l.Warn("cannot sync upstream states with "+where+"; retrying every interval",
			zap.Duration("interval", interval), zap.Error(err))
	case err == nil && o.lastErr != "":
		o.lastErr = ""
		l.Info("syncing upstream states with " + where + " works again")
	}
}
