package healthcheck

import (
	"context"
	"errors"
	"fmt"
)

// ErrUnknownUpstream is returned by Operate for an address no affinity
// policy of this process has used, or none has for the grace after which
// its record is forgotten (see Expire).
var ErrUnknownUpstream = errors.New("unknown upstream")

// StorageError is returned by Operate when the state was applied here
// but could not be written to storage for the other instances.
type StorageError struct {
	Dial  string
	State State
	Err   error
}

func (e StorageError) Error() string {
	return fmt.Sprintf("%s is now %s on this instance, but writing it to storage failed (retried every %s, other instances follow once it succeeds): %v",
		e.Dial, e.State, SyncInterval, e.Err)
}

func (e StorageError) Unwrap() error { return e.Err }

// Operate puts the upstream dialled at dial in state s on an operator's
// order: it applies here at once, is logged, and is written to the
// storage of the current syncer (if any; otherwise when one starts), from
// which every instance sharing that storage applies it. The probe never
// overrides it.
func Operate(ctx context.Context, dial string, s State) (*Upstream, error) {
	return defaultRegistry.operateDial(ctx, dial, s)
}

func (r *registry) operateDial(ctx context.Context, dial string, s State) (*Upstream, error) {
	u := r.lookup(dial)
	if u == nil {
		return nil, fmt.Errorf("%w %q: no affinity policy in this process has used it", ErrUnknownUpstream, dial)
	}
	rec := r.operate(u, s)
	ctx, cancel := context.WithTimeout(ctx, syncTimeout)
	defer cancel()
	var errs []error
	if sy := r.currentSyncer(); sy != nil {
		errs = append(errs, sy.write(ctx, u.Dial, rec, u.seen.Load()))
	}
	errs = append(errs, r.shareThroughRedis(ctx, u.Dial, rec, u.seen.Load()))
	if err := errors.Join(errs...); err != nil {
		return u, StorageError{Dial: u.Dial, State: s, Err: err}
	}
	return u, nil
}
