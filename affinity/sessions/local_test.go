package sessions

import (
	"context"
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"
)

// fakeDials numbers dials "up<id>:80" one way and maps them back with an
// offset the other, as a restarted process whose registry met its
// upstreams in another order would.
func fakeDial(id uint32) (string, bool) { return fmt.Sprintf("up%d:80", id), true }

func shiftedID(dial string) uint32 {
	var id uint32
	_, _ = fmt.Sscanf(dial, "up%d:80", &id)
	return id + 100
}

func TestSnapshotRoundTrip(t *testing.T) {
	const now = 1000
	src := NewTable(10_000)
	src.Put(1, 3, now, 600)          // main, probationary
	src.Put(2, 4|AliasBit, now, 600) // alias
	src.Put(3, 5, now, 300)
	src.Put(3, 5, now, 300)    // a second put establishes it
	src.Put(4, 3, now-100, 50) // expired at now
	src.Put(0, 6, now, 600)    // key 0 is stored as zeroKey
	src.Put(5, 7, now, 3600)   // retired below
	src.Retire(5, now+30)      // keeps its retirement
	b := encodeSnapshot(src, now, fakeDial)

	dst := NewTable(10_000)
	st, err := decodeSnapshot(b, dst, now+10, shiftedID)
	if err != nil {
		t.Fatal(err)
	}
	if st.entries != 5 || st.restored != 5 || st.savedAt != now {
		t.Fatalf("stats %+v, want 5 entries restored, saved at %d", st, now)
	}
	check := func(key uint64, up uint32, expires uint32, alias, established bool) {
		t.Helper()
		e, ok := dst.Peek(key, now+10)
		if !ok {
			t.Fatalf("key %d not restored", key)
		}
		if e.Upstream() != up || e.Expires() != expires || e.Alias() != alias || (e.Ref()&EstablishedBit != 0) != established {
			t.Errorf("key %d: up %d expires %d alias %v established %v; want %d %d %v %v",
				key, e.Upstream(), e.Expires(), e.Alias(), (e.Ref()&EstablishedBit != 0), up, expires, alias, established)
		}
	}
	check(1, 103, now+600, false, false)
	check(2, 104, now+600, true, false)
	check(3, 105, now+300, false, true)
	check(0, 106, now+600, false, false)
	check(5, 107, now+30, true, false) // retired: an alias, no longer a session
	if _, ok := dst.Peek(4, now+10); ok {
		t.Error("an entry expired when the snapshot was written came back")
	}
	// Live counts follow the restored main entries, by the new IDs.
	if dst.LiveCount(103) != 1 || dst.LiveCount(104) != 0 || dst.LiveCount(105) != 1 {
		t.Errorf("live counts 103=%d 104=%d 105=%d, want 1 0 1", dst.LiveCount(103), dst.LiveCount(104), dst.LiveCount(105))
	}
	// Entries that expired while the process was down stay out.
	late := NewTable(10_000)
	st, err = decodeSnapshot(b, late, now+301, shiftedID)
	if err != nil || st.restored != 3 || st.expired != 2 {
		t.Fatalf("read after 301s: %+v, %v; want 3 restored, 2 expired", st, err)
	}
}

func TestSnapshotKeepsNewerEntries(t *testing.T) {
	const now = 500
	src := NewTable(1000)
	src.Put(9, 1, now, 600)
	b := encodeSnapshot(src, now, fakeDial)
	dst := NewTable(1000)
	dst.Put(9, 2, now, 600) // written since: newer
	st, err := decodeSnapshot(b, dst, now, func(string) uint32 { return 1 })
	if err != nil || st.kept != 1 || st.restored != 0 {
		t.Fatalf("%+v, %v", st, err)
	}
	if up, _ := dst.Get(9, now, 0); up != 2 {
		t.Fatalf("the snapshot overwrote a newer entry: up %d", up)
	}
}

func TestSnapshotRejectsDamage(t *testing.T) {
	src := NewTable(1000)
	for k := uint64(1); k <= 50; k++ {
		src.Put(k, uint32(k%3), 100, 600)
	}
	good := encodeSnapshot(src, 100, fakeDial)
	cases := map[string][]byte{
		"empty":     nil,
		"magic":     append([]byte("XXXX"), good[4:]...),
		"truncated": good[:len(good)/2],
		"flipped":   func() []byte { b := append([]byte(nil), good...); b[40] ^= 1; return b }(),
		"version":   func() []byte { b := append([]byte(nil), good...); b[4] = 9; return b }(),
	}
	for name, b := range cases {
		dst := NewTable(1000)
		if _, err := decodeSnapshot(b, dst, 100, shiftedID); err == nil {
			t.Errorf("%s: no error", name)
		}
		if dst.Len() != 0 {
			t.Errorf("%s: %d entries recorded from a damaged snapshot", name, dst.Len())
		}
	}
	// An upstream without a dial (never happens with the registry) is
	// left out rather than written under a wrong name.
	b := encodeSnapshot(src, 100, func(id uint32) (string, bool) { return "a:1", id != 1 })
	dst := NewTable(1000)
	if st, err := decodeSnapshot(b, dst, 100, shiftedID); err != nil || st.entries != 50-17 {
		t.Fatalf("%+v, %v", st, err)
	}
}

// TestSnapshotFuzzedBytes: random bytes never panic the reader.
func TestSnapshotFuzzedBytes(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	src := NewTable(1000)
	src.Put(1, 1, 10, 60)
	good := encodeSnapshot(src, 10, fakeDial)
	for range 2000 {
		b := append([]byte(nil), good[:rng.IntN(len(good)+1)]...)
		if len(b) > 0 {
			b[rng.IntN(len(b))] = byte(rng.Uint32())
		}
		_, _ = decodeSnapshot(b, NewTable(1000), 10, shiftedID)
	}
}

// TestStoreLocalWritesPeriodically: a crash (no shutdown) loses at most
// an interval, and nothing is written while nothing changes.
func TestStoreLocalWritesPeriodically(t *testing.T) {
	storage := &certmagic.FileStorage{Path: t.TempDir()}
	tb := NewTable(1000)
	ps := newPersister(tb)
	defer ps.close()
	p := new(Handle)
	ps.want(p, storage, time.Second)
	tb.Put(77, 1, Now(), 600)
	deadline := time.Now().Add(5 * time.Second)
	for {
		if b, err := storage.Load(context.Background(), SnapshotStorageKey); err == nil && len(b) > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no snapshot within 5s at an interval of 1s")
		}
		time.Sleep(50 * time.Millisecond)
	}
	info, err := storage.Stat(context.Background(), SnapshotStorageKey)
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(2500 * time.Millisecond)
	again, err := storage.Stat(context.Background(), SnapshotStorageKey)
	if err != nil || !again.Modified.Equal(info.Modified) {
		t.Fatalf("the snapshot was written again although the table did not change (%v)", err)
	}
}

// BenchmarkSnapshotLoad reads back a snapshot of 1M sessions into an
// empty table bounded at 1M, as a restart does; it reports the time per
// load (the goal is at most a second) and the snapshot's size.
func BenchmarkSnapshotLoad(b *testing.B) {
	const n = 1_000_000
	src := NewTable(n)
	rng := rand.New(rand.NewPCG(5, 6))
	for i := range n {
		src.Put(rng.Uint64(), uint32(i%5), 1000, 1200)
	}
	snap := encodeSnapshot(src, 1000, fakeDial)
	b.ResetTimer()
	for range b.N {
		dst := NewTable(n)
		st, err := decodeSnapshot(snap, dst, 1000, shiftedID)
		if err != nil || st.restored < n*99/100 {
			b.Fatalf("%+v, %v", st, err)
		}
	}
	b.StopTimer()
	b.ReportMetric(float64(len(snap))/(1<<20), "MiB")
	b.Logf("loaded %d sessions (%d MiB) in %s per load", n, len(snap)>>20, b.Elapsed()/time.Duration(b.N))
}

// BenchmarkSnapshotWrite encodes 1M sessions, as the periodic write does.
func BenchmarkSnapshotWrite(b *testing.B) {
	const n = 1_000_000
	src := NewTable(n)
	rng := rand.New(rand.NewPCG(7, 8))
	for i := range n {
		src.Put(rng.Uint64(), uint32(i%5), 1000, 1200)
	}
	b.ResetTimer()
	for range b.N {
		_ = encodeSnapshot(src, 1000, fakeDial)
	}
}
