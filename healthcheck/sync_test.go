package healthcheck

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"
)

// acquire starts (or joins) the instance's syncer on st and releases it
// at the end of the test.
func (in *testInstance) acquire(t *testing.T, st certmagic.Storage) func() {
	t.Helper()
	release, err := acquireSyncer(in.reg, st)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(release)
	return release
}

func readRecord(t *testing.T, st certmagic.Storage, dial string) (storedRecord, bool) {
	t.Helper()
	b, err := st.Load(context.Background(), stateKey(dial))
	if err != nil {
		return storedRecord{}, false
	}
	var rec storedRecord
	if err := json.Unmarshal(b, &rec); err != nil {
		t.Fatalf("stored record %s: %v", b, err)
	}
	return rec, true
}

func TestStateKey(t *testing.T) {
	for dial, want := range map[string]string{
		"10.0.0.1:8080":       "caddy-affinity/states/10.0.0.1%3A8080",
		"[::1]:80":            "caddy-affinity/states/%5B%3A%3A1%5D%3A80",
		"unix//run/app.sock":  "caddy-affinity/states/unix%2F%2Frun%2Fapp.sock",
		"app-1.internal:3000": "caddy-affinity/states/app-1.internal%3A3000",
	} {
		if got := stateKey(dial); got != want {
			t.Errorf("stateKey(%q) = %q, want %q", dial, got, want)
		}
	}
}

// Two instances sharing a file_system storage folder agree on a state set
// through either one's admin API within 5 seconds.
func TestSyncTwoInstancesAgree(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	a, b := newInstance(t, "a"), newInstance(t, "b")
	const dial = "10.0.0.1:8080"
	a.reg.get(dial)
	b.reg.get(dial)
	a.acquire(t, &certmagic.FileStorage{Path: dir})
	b.acquire(t, &certmagic.FileStorage{Path: dir})

	if err := a.post(t, dial, Maintenance); err != nil {
		t.Fatalf("operate on a: %v", err)
	}
	// Written right away, not at the next round.
	st := &certmagic.FileStorage{Path: dir}
	if rec, ok := readRecord(t, st, dial); !ok || rec.State != Maintenance || rec.By != "a" || rec.Upstream != dial {
		t.Fatalf("stored record after POST: %+v (found %v)", rec, ok)
	}
	took := waitFor(t, 5*time.Second, "b applies a's maintenance", func() bool {
		return b.reg.lookup(dial).State() == Maintenance
	})
	t.Logf("b agreed after %s", took)
	ub := b.reg.lookup(dial)
	if ub.setter() != setByOperator {
		t.Errorf("b's state set by %q, want operator", ub.setter())
	}
	if !ub.Since().Equal(a.reg.lookup(dial).Since()) {
		t.Errorf("since differs: a %s, b %s", a.reg.lookup(dial).Since(), ub.Since())
	}
	b.waitLastChange(t, dial, "storage sync")
	changes := b.stateChanges(dial)
	if len(changes) != 1 || changes[0]["reason"] != "storage sync" || changes[0]["by"] != "a" ||
		changes[0]["new_state"] != "maintenance" {
		t.Errorf("b logged %v", changes)
	}

	// And back the other way.
	if err := b.post(t, dial, Up); err != nil {
		t.Fatalf("operate on b: %v", err)
	}
	waitFor(t, 5*time.Second, "a applies b's up", func() bool { return a.reg.lookup(dial).State() == Up })

	// An upstream a has never used gets its state as soon as a policy
	// uses it, and is not listed before.
	b.reg.get("10.0.0.9:80")
	if err := b.post(t, "10.0.0.9:80", Draining); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "a keeps a new upstream's state aside", func() bool {
		a.reg.mu.RLock()
		defer a.reg.mu.RUnlock()
		_, ok := a.reg.pending["10.0.0.9:80"]
		return ok
	})
	if a.reg.lookup("10.0.0.9:80") != nil {
		t.Error("a lists an upstream no config of its uses")
	}
	if u := a.reg.get("10.0.0.9:80"); u.State() != Draining || u.setter() != setByOperator {
		t.Errorf("a's first use of the upstream: %s set by %q, want draining by operator", u.State(), u.setter())
	}
}

// States survive a restart: a new instance on the same storage has them
// as soon as AcquireSyncer returns.
func TestSyncRestartLoadsStates(t *testing.T) {
	dir := t.TempDir()
	a := newInstance(t, "a")
	a.reg.get("10.0.0.1:8080")
	a.reg.get("10.0.0.2:8080")
	release := a.acquire(t, &certmagic.FileStorage{Path: dir})
	a.post(t, "10.0.0.1:8080", Draining)
	a.post(t, "10.0.0.2:8080", Maintenance)
	wantSince := a.reg.lookup("10.0.0.1:8080").Since()
	release()

	restarted := newInstance(t, "a")
	restarted.acquire(t, &certmagic.FileStorage{Path: dir})
	// A policy's first use of each (get) finds its state.
	u1, u2 := restarted.reg.get("10.0.0.1:8080"), restarted.reg.get("10.0.0.2:8080")
	if u1.State() != Draining || u2.State() != Maintenance {
		t.Errorf("after restart: %s %s, want draining maintenance", u1.State(), u2.State())
	}
	if !u1.Since().Equal(wantSince) {
		t.Errorf("since after restart %s, want %s", u1.Since(), wantSince)
	}
}

// A state set before any syncer runs is written when one starts.
func TestSyncWritesStateSetBeforeStart(t *testing.T) {
	dir := t.TempDir()
	st := &certmagic.FileStorage{Path: dir}
	a := newInstance(t, "a")
	a.reg.get("10.0.0.1:8080")
	if err := a.post(t, "10.0.0.1:8080", Draining); err != nil {
		t.Fatalf("operate without storage: %v", err)
	}
	if _, ok := readRecord(t, st, "10.0.0.1:8080"); ok {
		t.Fatal("written without a syncer?")
	}
	a.acquire(t, st)
	if rec, ok := readRecord(t, st, "10.0.0.1:8080"); !ok || rec.State != Draining {
		t.Fatalf("not written when the syncer started: %+v %v", rec, ok)
	}
}

// Operator states are last-writer-wins by since, whatever order the
// instances see them in, and a write lost to a concurrent one is redone.
func TestSyncNewestWins(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	st := &certmagic.FileStorage{Path: dir}
	a, b := newInstance(t, "a"), newInstance(t, "b")
	const dial = "10.0.0.1:8080"
	a.reg.operate(a.reg.get(dial), Maintenance)
	time.Sleep(2 * time.Millisecond)
	b.reg.operate(b.reg.get(dial), Draining) // later: wins
	// b starts first and writes its record; a starts, finds a newer one.
	b.acquire(t, st)
	a.acquire(t, st)
	if s := a.reg.lookup(dial).State(); s != Draining {
		t.Fatalf("a: %s, want b's newer draining", s)
	}
	waitFor(t, 3*time.Second, "b keeps draining", func() bool { return b.reg.lookup(dial).State() == Draining })

	// Storage gets an older record than b's (as if a's write had landed
	// after b's): b writes its own back and nobody applies the older one.
	older := *a.reg.lookup(dial).operator.Load()
	older.State, older.Since = Up, older.Since-1000
	if err := writeRecord(context.Background(), st, dial, older, time.Now().UnixNano()); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "the newer record is written back", func() bool {
		rec, ok := readRecord(t, st, dial)
		return ok && rec.State == Draining
	})
	if a.reg.lookup(dial).State() != Draining || b.reg.lookup(dial).State() != Draining {
		t.Error("an older record was applied")
	}
}

// Files that are not state records are ignored: garbage is logged once,
// and a copy of a record under another name (a storage's temporary file)
// does not create an upstream.
func TestSyncIgnoresStrayFiles(t *testing.T) {
	dir := t.TempDir()
	st := &certmagic.FileStorage{Path: dir}
	ctx := context.Background()
	if err := st.Store(ctx, statesPrefix+"/garbage", []byte("{not json")); err != nil {
		t.Fatal(err)
	}
	rec, _ := json.Marshal(storedRecord{Upstream: "10.0.0.1:8080", operatorRecord: operatorRecord{State: Draining, Since: 1, By: "x"}})
	if err := st.Store(ctx, statesPrefix+"/123456", rec); err != nil {
		t.Fatal(err)
	}
	bad, _ := json.Marshal(map[string]any{"upstream": "10.0.0.2:8080", "state": "sleeping", "since": 5})
	if err := st.Store(ctx, stateKey("10.0.0.2:8080"), bad); err != nil {
		t.Fatal(err)
	}
	a := newInstance(t, "a")
	s := newSyncer(a.reg, &heldStorage{st}, time.Hour) // rounds run by hand
	for range 3 {
		s.round()
	}
	if n := len(a.reg.all()); n != 0 {
		t.Errorf("stray files created %d upstreams", n)
	}
	if n := len(a.reg.pending); n != 0 {
		t.Errorf("stray files kept %d states aside", n)
	}
	warns := a.logs.FilterMessage("ignoring malformed upstream state in storage").All()
	if len(warns) != 2 {
		t.Errorf("got %d warnings, want one per bad file (2): %v", len(warns), warns)
	}
	for _, w := range warns {
		if p, _ := w.ContextMap()["problem"].(string); !strings.Contains(p, "not a state record") {
			t.Errorf("warning problem %q", p)
		}
	}
}

// failingStorage fails Store while broken is set.
type failingStorage struct {
	*certmagic.FileStorage
	broken atomic.Bool
}

func (s *failingStorage) Store(ctx context.Context, key string, value []byte) error {
	if s.broken.Load() {
		return errors.New("disk on fire")
	}
	return s.FileStorage.Store(ctx, key, value)
}

// A failed write is an error that says the state was applied here, and the
// syncer writes it once storage works again.
func TestSyncWriteFailure(t *testing.T) {
	t.Parallel()
	st := &failingStorage{FileStorage: &certmagic.FileStorage{Path: t.TempDir()}}
	a := newInstance(t, "a")
	a.reg.get("10.0.0.1:8080")
	a.acquire(t, st)
	st.broken.Store(true)
	err := a.post(t, "10.0.0.1:8080", Maintenance)
	var se StorageError
	if !errors.As(err, &se) {
		t.Fatalf("error %v, want a StorageError (the admin API answers it with 500)", err)
	}
	msg := err.Error()
	for _, want := range []string{"10.0.0.1:8080 is now maintenance on this instance", "writing it to storage failed", "disk on fire"} {
		if !strings.Contains(msg, want) {
			t.Errorf("error %q does not say %q", msg, want)
		}
	}
	if a.reg.lookup("10.0.0.1:8080").State() != Maintenance {
		t.Error("not applied locally")
	}
	waitFor(t, 3*time.Second, "the failure is logged", func() bool {
		return a.logs.FilterMessageSnippet("cannot sync upstream states").Len() == 1
	})
	st.broken.Store(false)
	waitFor(t, 3*time.Second, "written once storage works", func() bool {
		r, ok := readRecord(t, st.FileStorage, "10.0.0.1:8080")
		return ok && r.State == Maintenance
	})
	waitFor(t, 3*time.Second, "the recovery is logged", func() bool {
		return a.logs.FilterMessageSnippet("works again").Len() == 1
	})
	if n := a.logs.FilterMessageSnippet("cannot sync upstream states").Len(); n != 1 {
		t.Errorf("failure logged %d times, want once", n)
	}
}

// A reload acquires the syncer again with the new config's storage value
// before the old config releases it: one syncer, switched to the newest
// value, stopped by the last release.
func TestSyncerAcrossReload(t *testing.T) {
	dir := t.TempDir()
	a := newInstance(t, "a")
	old := &certmagic.FileStorage{Path: dir}
	releaseOld := a.acquire(t, old)
	s1 := a.reg.currentSyncer()
	nu := &certmagic.FileStorage{Path: dir}
	releaseNew := a.acquire(t, nu)
	if s := a.reg.currentSyncer(); s != s1 {
		t.Fatal("the same storage got a second syncer")
	}
	if s1.storage() != nu {
		t.Error("the syncer does not use the newest config's storage")
	}
	releaseOld()
	releaseOld() // idempotent
	if a.reg.currentSyncer() != s1 || s1.storage() != nu {
		t.Fatal("releasing the old config stopped the syncer or switched it back")
	}
	// Still syncing.
	a.reg.get("10.0.0.1:8080")
	a.post(t, "10.0.0.1:8080", Draining)
	if _, ok := readRecord(t, nu, "10.0.0.1:8080"); !ok {
		t.Error("not written after the reload")
	}
	releaseNew()
	if a.reg.currentSyncer() != nil {
		t.Fatal("syncer still current after the last release")
	}
	select {
	case <-s1.done:
	case <-time.After(time.Second):
		t.Fatal("syncer loop still running after the last release")
	}

	// Another storage location gets its own syncer.
	a.acquire(t, &certmagic.FileStorage{Path: filepath.Join(dir, "other")})
	b := a.reg.currentSyncer()
	if b == nil || b == s1 {
		t.Fatal("no new syncer for a new storage")
	}
}

func TestStorageIdentity(t *testing.T) {
	a := storageIdentity(&certmagic.FileStorage{Path: "/x"})
	if a != storageIdentity(&certmagic.FileStorage{Path: "/x"}) || a == storageIdentity(&certmagic.FileStorage{Path: "/y"}) {
		t.Errorf("file storages: %q", a)
	}
}

func TestMain(m *testing.M) {
	// The e2e test starts Caddy, which would write its instance ID and
	// autosave under the user's directories.
	tmp, err := os.MkdirTemp("", "healthcheck-test")
	if err != nil {
		panic(err)
	}
	os.Setenv("XDG_DATA_HOME", filepath.Join(tmp, "data"))
	os.Setenv("XDG_CONFIG_HOME", filepath.Join(tmp, "config"))
	os.Setenv("HOME", tmp)
	code := m.Run()
	os.RemoveAll(tmp)
	os.Exit(code)
}
