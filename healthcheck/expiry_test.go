package healthcheck

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"
	"github.com/caddyserver/certmagic"
)

// fakeClock is a registry's clock, moved by hand.
type fakeClock struct{ ns atomic.Int64 }

func newFakeClock() *fakeClock {
	c := new(fakeClock)
	c.ns.Store(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC).UnixNano())
	return c
}

func (c *fakeClock) now() time.Time          { return time.Unix(0, c.ns.Load()) }
func (c *fakeClock) advance(d time.Duration) { c.ns.Add(int64(d)) }

func caddyUps(dials ...string) []*reverseproxy.Upstream {
	ups := make([]*reverseproxy.Upstream, len(dials))
	for i, d := range dials {
		ups[i] = &reverseproxy.Upstream{Host: new(reverseproxy.Host), Dial: d}
	}
	return ups
}

// A record no config uses is marked so at the next looks, kept for the
// grace (and while it has live sessions), then forgotten: gone from
// every listing, its ID never given to another upstream, its operator
// state kept aside for the address's next use.
func TestRegistryForgetsUnusedUpstreams(t *testing.T) {
	in := newInstance(t, "a")
	r, clock := in.reg, newFakeClock()
	r.clock = clock.now
	const kept, dropped, busy = "10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"
	r.observe(caddyUps(kept, dropped, busy), clock.now())
	old := r.lookup(dropped)
	r.operate(old, Draining)
	for _, d := range []string{kept, dropped, busy} {
		if !r.lookup(d).Configured() {
			t.Fatalf("%s not configured after a look that saw it", d)
		}
	}

	// A reload drops two of them: the farm's looks see only kept.
	busyID := r.lookup(busy).ID
	look := func(d time.Duration) []string {
		clock.advance(d)
		r.observe(caddyUps(kept), clock.now())
		return r.expire(clock.now(), func(id uint32) bool { return id == busyID })
	}
	if gone := look(time.Second); len(gone) != 0 {
		t.Fatalf("forgot %v at once", gone)
	}
	if old.Configured() || !r.lookup(kept).Configured() {
		t.Errorf("after the reload: dropped configured %v, kept %v", old.Configured(), r.lookup(kept).Configured())
	}
	if gone := look(forgetAfter - 2*time.Second); len(gone) != 0 {
		t.Fatalf("forgot %v within the grace", gone)
	}
	if gone := look(2 * time.Second); len(gone) != 1 || gone[0] != dropped {
		t.Fatalf("after the grace, forgot %v, want [%s] (%s has live sessions)", gone, dropped, busy)
	}
	if r.lookup(dropped) != nil || r.byIDLookup(old.ID) != nil {
		t.Error("the forgotten record is still found")
	}
	for _, u := range r.all() {
		if u.Dial == dropped {
			t.Error("all() lists the forgotten record")
		}
	}
	if r.lookup(busy) == nil || r.lookup(kept) == nil {
		t.Fatal("forgot a configured upstream or one with live sessions")
	}
	// Its sessions ended: forgotten at the next look.
	clock.advance(time.Second)
	if gone := r.expire(clock.now(), nil); len(gone) != 1 || gone[0] != busy {
		t.Errorf("without sessions, forgot %v, want [%s]", gone, busy)
	}

	// The address used again: a new record and a new ID (the session
	// table may still hold the old one's), in its operator's state.
	again := r.get(dropped)
	if again == old || again.ID <= old.ID {
		t.Errorf("reused: old ID %d, new ID %d", old.ID, again.ID)
	}
	if again.State() != Draining || again.setter() != setByOperator {
		t.Errorf("used again within the state grace: %s by %q, want draining by operator", again.State(), again.setter())
	}

	// Used again after the state grace: a new upstream behind an old
	// address does not inherit the state.
	r.operate(again, Maintenance)
	clock.advance(time.Second)
	r.observe(caddyUps(kept), clock.now())
	r.observe(caddyUps(kept), clock.now())
	clock.advance(forgetAfter + time.Second)
	r.observe(caddyUps(kept), clock.now())
	if gone := r.expire(clock.now(), nil); len(gone) != 1 {
		t.Fatalf("forgot %v", gone)
	}
	clock.advance(stateGrace)
	if u := r.get(dropped); u.State() != Up || u.setter() != setByNone {
		t.Errorf("used again after the state grace: %s by %q, want up", u.State(), u.setter())
	}
}

// Stored states expire by their seen stamp: an instance that uses the
// upstream keeps its state alive with a write every seenRefresh, another
// instance sharing the storage that does not use it never deletes it;
// once no instance has used it for stateGrace, it is deleted and not
// applied to a new upstream at the address.
func TestSyncDeletesStatesNoInstanceUses(t *testing.T) {
	dir := t.TempDir()
	st := &certmagic.FileStorage{Path: dir}
	ctx := context.Background()
	clock := newFakeClock()
	a, b := newInstance(t, "a"), newInstance(t, "b")
	a.reg.clock, b.reg.clock = clock.now, clock.now
	// Rounds by hand, on the shared clock.
	sa := newSyncer(a.reg, &heldStorage{st}, time.Hour)
	sb := newSyncer(b.reg, &heldStorage{st}, time.Hour)
	round := func() {
		t.Helper()
		for _, s := range []*Syncer{sa, sb} {
			if err := s.syncOnce(ctx); err != nil {
				t.Fatal(err)
			}
		}
	}
	const dial = "10.0.0.5:8080"
	a.reg.get(dial)
	a.reg.addSyncer(sa)
	if err := a.post(t, dial, Draining); err != nil {
		t.Fatal(err)
	}
	rec, ok := readRecord(t, st, dial)
	if !ok || rec.Seen != clock.now().UnixNano() {
		t.Fatalf("stored by the POST: %+v %v, want seen now", rec, ok)
	}
	round()

	// a goes on using it, b never does; rounds every minute for two
	// grace periods.
	writes := 0
	for range int(2 * stateGrace / (2 * time.Minute)) {
		clock.advance(2 * time.Minute)
		a.reg.get(dial) // a's farm looks at its config
		prev := rec
		round()
		if rec, ok = readRecord(t, st, dial); !ok {
			t.Fatalf("deleted at %s while a uses it", clock.now())
		}
		if rec.Seen != prev.Seen {
			writes++
		}
	}
	if max := int(2*stateGrace/seenRefresh) + 1; writes == 0 || writes > max {
		t.Errorf("seen written %d times in %s, want 1..%d (every %s)", writes, 2*stateGrace, max, seenRefresh)
	}
	if rec.State != Draining {
		t.Errorf("the refreshes changed the record: %+v", rec)
	}

	// a stops using it (a reload dropped it, its record is forgotten);
	// b, which never used it, deletes it once the grace has passed.
	clock.advance(forgetAfter + time.Second)
	a.reg.expire(clock.now(), nil)
	round()
	if _, ok := readRecord(t, st, dial); !ok {
		t.Fatal("deleted within the grace")
	}
	clock.advance(stateGrace)
	if err := sb.syncOnce(ctx); err != nil {
		t.Fatal(err)
	}
	if rec, ok := readRecord(t, st, dial); ok {
		t.Fatalf("not deleted after the grace: %+v", rec)
	}
	if len(b.logs.FilterMessage("deleted the stored state of an upstream no instance has used").All()) != 1 {
		t.Error("the deletion was not logged")
	}
	round()
	if _, ok := readRecord(t, st, dial); ok {
		t.Error("a wrote the deleted state back")
	}
	// A new upstream at the address, on either instance, starts up.
	for _, in := range []*testInstance{a, b} {
		if u := in.reg.get(dial); u.State() != Up {
			t.Errorf("%s: a new upstream at the address is %s", in.name, u.State())
		}
	}
}

// A stale record left by an older version (no seen) or by an instance
// gone for longer than the grace is deleted by the first round that
// reads it and never applied, even by an instance that uses the address.
func TestSyncIgnoresStaleState(t *testing.T) {
	st := &certmagic.FileStorage{Path: t.TempDir()}
	ctx := context.Background()
	clock := newFakeClock()
	const dial = "10.0.0.6:8080"
	old := operatorRecord{State: Maintenance, Since: clock.now().Add(-stateGrace - time.Hour).UnixNano(), By: "gone"}
	if err := writeRecord(ctx, st, dial, old, 0); err != nil {
		t.Fatal(err)
	}
	a := newInstance(t, "a")
	a.reg.clock = clock.now
	u := a.reg.get(dial)
	if err := newSyncer(a.reg, &heldStorage{st}, time.Hour).syncOnce(ctx); err != nil {
		t.Fatal(err)
	}
	if u.State() != Up {
		t.Errorf("a state unused for %s applied: %s", stateGrace, u.State())
	}
	if _, ok := readRecord(t, st, dial); ok {
		t.Error("the stale record is still stored")
	}
}
