package sessions

import (
	"fmt"
	"math/rand/v2"
	"runtime"
	"sync"
	"testing"
)

func TestTableSlidingTTL(t *testing.T) {
	tb := NewTable(1000)
	tb.Put(1, 7, 100, 60)
	if up, ok := tb.Get(1, 150, 60); !ok || up != 7 {
		t.Fatalf("live entry: got %d, %v", up, ok)
	}
	// The get at 150 slid the expiry to 210.
	if _, ok := tb.Get(1, 200, 0); !ok {
		t.Fatal("entry expired although it was touched within its TTL")
	}
	if _, ok := tb.Get(1, 211, 60); ok {
		t.Fatal("entry outlived its TTL")
	}
	if tb.Len() != 0 {
		t.Fatal("expired entry not deleted on read")
	}
}

func TestTableIsBoundedUnderRandomKeyFlood(t *testing.T) {
	const bound = 256 * 40
	tb := NewTable(bound)
	rng := rand.New(rand.NewPCG(1, 2))
	// A long-lived session, touched now and then, among a flood of
	// one-shot random keys (a client sending a new cookie every time).
	tb.Put(42, 1, 0, 3600)
	for i := 0; i < 20*bound; i++ {
		tb.Put(rng.Uint64(), 2, uint32(i/1000), 60)
		if i%500 == 0 {
			tb.Get(42, uint32(i/1000), 3600)
		}
	}
	if n := tb.Len(); n > bound {
		t.Fatalf("table holds %d entries, bound %d", n, bound)
	}
	if tb.Evicted() == 0 {
		t.Fatal("no eviction counted")
	}
	if up, ok := tb.Get(42, 200, 0); !ok || up != 1 {
		t.Fatal("the flood evicted a live, recently used session with a long TTL")
	}
}

func TestTableSweepCounts(t *testing.T) {
	tb := NewTable(1000)
	for k := uint64(0); k < 30; k++ {
		tb.Put(k, uint32(k%3), 0, uint32(10+k))
	}
	if removed := tb.Sweep(25); removed != 15 { // keys with 10+k < 25 (k < 15) are expired
		t.Fatalf("sweep removed %d entries, want 15", removed)
	}
	total := tb.LiveCount(0) + tb.LiveCount(1) + tb.LiveCount(2)
	if total != 15 || tb.LiveCount(0) != 5 {
		t.Fatalf("live counts %d, %d, %d after a sweep, want 15 live, 5 per upstream",
			tb.LiveCount(0), tb.LiveCount(1), tb.LiveCount(2))
	}
	if tb.Len() != 15 {
		t.Fatalf("sweep left %d entries, want 15", tb.Len())
	}
	// An alias entry (another key of a session) is not a session.
	tb.Put(100, 1|AliasBit, 25, 60)
	if up, ok := tb.Get(100, 25, 0); !ok || up != 1 {
		t.Fatalf("alias entry reads as %d, %v; want upstream 1", up, ok)
	}
	if tb.Sweep(25); tb.LiveCount(1) != 5 {
		t.Fatalf("an alias entry was counted as a session: upstream 1 has %d", tb.LiveCount(1))
	}
}

func TestTableSeedsPlacement(t *testing.T) {
	// Two tables place the same keys in different shards and slots, and
	// neither by the key's own low byte, which anyone can compute.
	a, b := NewTable(1000), NewTable(1000)
	sameShard, lowByte := 0, 0
	for k := uint64(1); k <= 1000; k++ {
		ha, hb := a.place(k*0x9e3779b97f4a7c15), b.place(k*0x9e3779b97f4a7c15)
		if ha == hb {
			t.Fatalf("key %d: both tables hash it to %#x", k, ha)
		}
		if ha%Shards == hb%Shards {
			sameShard++
		}
		if ha%Shards == k*0x9e3779b97f4a7c15%Shards {
			lowByte++
		}
	}
	// About 4 of 1000 of each by chance.
	if sameShard > 30 || lowByte > 30 {
		t.Fatalf("of 1000 keys, %d share their shard in two tables and %d are in the shard of their low byte", sameShard, lowByte)
	}
	// Keys aimed at one shard by their low byte, as they could be before
	// the seed, land all over the table.
	aimed := map[*tableShard]bool{}
	for k := uint64(1); k <= 5000; k++ {
		aimed[a.shard(a.place(k<<8))] = true
	}
	if len(aimed) < Shards*9/10 {
		t.Fatalf("5000 keys with one low byte land in %d shards of %d", len(aimed), Shards)
	}
}

func TestTableFloodSparesEstablishedSessions(t *testing.T) {
	// Established sessions fill 40 % of the table; a flood of
	// 10 × max_sessions one-shot keys, with TTLs longer than theirs (so
	// that "closest to expiry" alone would pick them), evicts none.
	const bound = Shards * 390 // max_sessions 100k
	tb := NewTable(bound)
	rng := rand.New(rand.NewPCG(3, 4))
	established := make([]uint64, bound*4/10)
	for i := range established {
		established[i] = rng.Uint64()
		tb.Put(established[i], uint32(i%7), 0, 600)
		tb.Put(established[i], uint32(i%7), 1, 600) // its second request
	}
	for i := 0; i < 10*bound; i++ {
		tb.Put(rng.Uint64(), 9, uint32(i/bound), 3600)
	}
	lost := 0
	for i, k := range established {
		if e, ok := tb.Peek(k, 100); !ok || e.Upstream() != uint32(i%7) {
			lost++
		}
	}
	t.Logf("max_sessions %d, %d established sessions, %d one-shot keys: %d established evicted, %d evictions in all",
		bound, len(established), 10*bound, lost, tb.Evicted())
	if lost > 0 {
		t.Fatalf("the flood evicted %d of %d established sessions", lost, len(established))
	}
	if n := tb.Len(); n > bound {
		t.Fatalf("table holds %d entries, bound %d", n, bound)
	}
	if ev := tb.Evicted(); ev < uint64(9*bound) {
		t.Fatalf("%d evictions counted, want at least %d", ev, 9*bound)
	}
	checkTable(t, tb)
}

func TestTableMemoryDoesNotGrowUnderChurn(t *testing.T) {
	// A table at its bound, then 4 × max_sessions new keys, each evicting
	// one: the heap does not grow and stays under 24 bytes per session.
	const bound = Shards * 1000
	rng := rand.New(rand.NewPCG(5, 6))
	before := heapAlloc()
	tb := NewTable(bound)
	for tb.Len() < bound {
		for range 1000 {
			tb.Put(rng.Uint64(), 1, 0, 600)
		}
	}
	full := heapAlloc()
	for i := 0; i < 4*bound; i++ {
		tb.Put(rng.Uint64(), 1, 1, 600)
	}
	after := heapAlloc()
	for i := range tb.shards {
		if n := len(tb.shards[i].slots); n != slotsFor(bound/Shards) {
			t.Fatalf("shard %d has %d slots, want %d", i, n, slotsFor(bound/Shards))
		}
	}
	if grew := int64(after) - int64(full); grew > 256<<10 {
		t.Fatalf("the heap grew by %d bytes under churn (from %d to %d)", grew, full, after)
	}
	if per := float64(after-before) / bound; per > 24 {
		t.Fatalf("%.1f bytes per session after churn, want at most 24", per)
	}
	runtime.KeepAlive(tb)
}

// heapAlloc returns the bytes of live heap objects after a collection.
func heapAlloc() uint64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}

func TestTableDeletionMatchesAMap(t *testing.T) {
	// Random operations on keys that share one shard, so that its
	// probe runs are long and deletions shift entries, against a map.
	rng := rand.New(rand.NewPCG(9, 10))
	ops := make([]byte, 150_000)
	for i := range ops {
		ops[i] = byte(rng.Uint32())
	}
	runTableOps(t, ops)
}

func TestTableLiveCountsAnyID(t *testing.T) {
	tb := NewTable(1000)
	ids := []uint32{0, 1023, 65535, 65536, 70_000, 1 << 20, 1<<28 + 7, UpstreamMask}
	for i, id := range ids {
		for k := 0; k <= i; k++ {
			tb.Put(uint64(i)<<32|uint64(k)+1, id, 0, 60)
		}
		tb.Put(uint64(i)<<32|0xffff, id|AliasBit, 0, 60) // not a session
	}
	for i, id := range ids {
		if got := tb.LiveCount(id); got != int64(i+1) {
			t.Fatalf("upstream %d: live count %d, want %d", id, got, i+1)
		}
	}
	// An entry that moves to another upstream moves its count.
	tb.Put(uint64(4)<<32|1, 1<<20, 0, 60)
	if tb.LiveCount(70_000) != 4 || tb.LiveCount(1<<20) != 7 {
		t.Fatalf("after a move: %d and %d, want 4 and 7", tb.LiveCount(70_000), tb.LiveCount(1<<20))
	}
	tb.Remove(uint64(7)<<32 | 1)
	if got := tb.LiveCount(UpstreamMask); got != 7 {
		t.Fatalf("after a removal: %d, want 7", got)
	}
	if tb.LiveCount(UpstreamMask+1) != 0 || tb.LiveCount(AliasBit|65536) != 0 {
		t.Fatal("an ID with flag bits has a count")
	}
}

func TestTableLiveCountsUnderConcurrency(t *testing.T) {
	// Goroutines put, follow, retire and remove shared keys on a table
	// that evicts; afterwards the counters equal a recount.
	tb := NewTable(Shards * 4)
	ids := []uint32{3, 65536, 70_000, 1 << 20}
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(g), 11))
			for step := range 20_000 {
				key := rng.Uint64N(2000)
				up := ids[rng.IntN(len(ids))]
				if rng.IntN(4) == 0 {
					up |= AliasBit
				}
				now := uint32(step / 100)
				switch rng.IntN(8) {
				case 0, 1, 2:
					tb.Put(key, up, now, uint32(1+rng.IntN(20)))
				case 3:
					tb.Remove(key)
				case 4:
					tb.Retire(key, now)
				case 5:
					if step%1000 == 0 {
						tb.Sweep(now)
					}
				default:
					tb.Follow(key, now, 10, rng.IntN(2) == 0)
				}
			}
		})
	}
	wg.Wait()
	want := recount(tb)
	for _, id := range ids {
		if got := tb.LiveCount(id); got != want[id] {
			t.Fatalf("upstream %d: live count %d, recount %d", id, got, want[id])
		}
	}
	if tb.Evicted() == 0 {
		t.Fatal("the table never evicted: eviction is not exercised")
	}
	checkTable(t, tb)
}

func TestTableCountsEvictionsAndExpiries(t *testing.T) {
	tb := NewTable(Shards * 4) // 4 entries per shard
	keys := keysInShard(tb, 0, 9)
	for _, k := range keys[:4] {
		tb.Put(k, 1, 0, 10)
	}
	// At 20 the four are expired: new entries take their room, and that
	// is no eviction.
	for _, k := range keys[4:8] {
		tb.Put(k, 1, 20, 100)
	}
	if ev, ex := tb.Evicted(), tb.ExpiredCount(); ev != 0 || ex != 4 {
		t.Fatalf("replacing expired entries: %d evicted, %d expired; want 0 and 4", ev, ex)
	}
	// The shard holds four live entries: the next one evicts one.
	tb.Put(keys[8], 1, 20, 100)
	if ev, ex := tb.Evicted(), tb.ExpiredCount(); ev != 1 || ex != 4 {
		t.Fatalf("evicting a live entry: %d evicted, %d expired; want 1 and 4", ev, ex)
	}
	// A lookup that finds an entry expired, and a sweep.
	other := keysInShard(tb, 1, 3)
	for _, k := range other {
		tb.Put(k, 2, 20, 5)
	}
	if _, ok := tb.Get(other[0], 30, 0); ok {
		t.Fatal("an expired entry was found")
	}
	if n := tb.Sweep(30); n != 2 {
		t.Fatalf("sweep removed %d, want 2", n)
	}
	if ev, ex := tb.Evicted(), tb.ExpiredCount(); ev != 1 || ex != 7 {
		t.Fatalf("after a lookup and a sweep: %d evicted, %d expired; want 1 and 7", ev, ex)
	}
	// Expired entries go first, even established ones next to a live
	// probationary one.
	third := keysInShard(tb, 2, 5)
	for _, k := range third[:3] {
		tb.Put(k, 3, 0, 10)
		tb.Put(k, 3, 0, 10)
	}
	tb.Put(third[3], 3, 0, 100)
	tb.Put(third[4], 3, 20, 100)
	if _, ok := tb.Peek(third[3], 20); !ok {
		t.Fatal("a live probationary entry was evicted before expired ones")
	}
	if ev, ex := tb.Evicted(), tb.ExpiredCount(); ev != 1 || ex != 8 {
		t.Fatalf("evicting an expired established entry: %d evicted, %d expired; want 1 and 8", ev, ex)
	}
}

func TestTableKeyZero(t *testing.T) {
	tb := NewTable(1000)
	tb.Put(0, 5, 0, 60)
	if up, ok := tb.Get(0, 1, 0); !ok || up != 5 {
		t.Fatalf("key 0 reads as %d, %v", up, ok)
	}
	tb.Remove(0)
	if _, ok := tb.Get(0, 1, 0); ok || tb.Len() != 0 {
		t.Fatal("key 0 was not removed")
	}
}

func TestTableEstablishesOnSecondSight(t *testing.T) {
	tb := NewTable(1000)
	tb.Put(1, 1, 0, 60)
	tb.Put(2, 1, 0, 60)
	tb.Put(3, 1|AliasBit, 0, 60)
	if e, _ := tb.Peek(1, 0); e.established() {
		t.Fatal("an entry seen once is established")
	}
	tb.Put(1, 1, 1, 60)        // a second put
	tb.Follow(2, 1, 60, true)  // a hit
	tb.Follow(3, 1, 60, false) // an alias not followed: untouched
	for k, want := range map[uint64]bool{1: true, 2: true, 3: false} {
		if e, _ := tb.Peek(k, 1); e.established() != want {
			t.Fatalf("key %d: established %v, want %v", k, e.established(), want)
		}
	}
	// A put over an expired entry starts a new, probationary one.
	tb.Put(1, 1, 100, 60)
	if e, _ := tb.Peek(1, 100); e.established() {
		t.Fatal("a put over an expired entry kept it established")
	}
}

// keysInShard returns n distinct keys that tb places in shard i.
func keysInShard(tb *Table, i, n int) []uint64 {
	var keys []uint64
	for k := uint64(1); len(keys) < n; k++ {
		if tb.shard(tb.place(k)) == &tb.shards[i] {
			keys = append(keys, k)
		}
	}
	return keys
}

// checkTable checks that every shard's count matches its slots and that
// every entry is reachable from its home slot without crossing an empty
// one, which backward-shift deletion must keep true.
func checkTable(t testing.TB, tb *Table) {
	t.Helper()
	for i := range tb.shards {
		checkShard(t, tb, i)
	}
}

// checkShard is checkTable for shard i.
func checkShard(t testing.TB, tb *Table, i int) {
	t.Helper()
	s := &tb.shards[i]
	s.mu.Lock()
	defer s.mu.Unlock()
	n, occupied, established := len(s.slots), 0, 0
	for j, sl := range s.slots {
		if sl.key == 0 {
			continue
		}
		occupied++
		if sl.established() {
			established++
		}
		for p := home(tb.place(sl.key), n); p != j; p = (p + 1) % n {
			if s.slots[p].key == 0 {
				t.Fatalf("shard %d: the entry in slot %d is cut off from its home by empty slot %d", i, j, p)
			}
		}
		if s.find(sl.key, tb.place(sl.key)) != j {
			t.Fatalf("shard %d: key %#x is in slot %d and found elsewhere", i, sl.key, j)
		}
	}
	if occupied != int(s.count) || established != int(s.established) {
		t.Fatalf("shard %d: %d slots occupied, count %d; %d established, counted %d", i, occupied, s.count, established, s.established)
	}
}

func TestTableLoweredBound(t *testing.T) {
	// A shard beyond a lowered bound evicts down to it on its next
	// insert, and keeps its array.
	tb := NewTable(Shards * 100)
	keys := keysInShard(tb, 0, 51)
	for _, k := range keys[:50] {
		tb.Put(k, 1, 0, 60)
	}
	slots := len(tb.shards[0].slots)
	tb.SetMax(Shards * 10)
	tb.Put(keys[50], 1, 0, 60)
	if n := tb.Len(); n != 10 {
		t.Fatalf("the shard holds %d entries after an insert under a bound of 10", n)
	}
	if ev := tb.Evicted(); ev != 41 {
		t.Fatalf("%d evictions counted, want 41", ev)
	}
	if tb.LiveCount(1) != 10 || len(tb.shards[0].slots) != slots {
		t.Fatalf("live count %d, %d slots; want 10 and %d", tb.LiveCount(1), len(tb.shards[0].slots), slots)
	}
	checkTable(t, tb)
}

// An attacker's sessions of a few requests each, as many as 100 ×
// max_sessions requests buy, evict no established session while
// established sessions fill less than half the table (issue 19: 6,000
// sessions of two requests broke 252 of 900 later visits of 300
// established sessions with max_sessions 2560). Each attacker request is
// what a request of a known key does to the table: a hit, then a put.
func TestTableFewRequestSessionsSpareEstablished(t *testing.T) {
	const bound = 2560
	for _, perKey := range []int{2, 3, 5, 10} {
		tb := NewTable(bound)
		rng := rand.New(rand.NewPCG(7, uint64(perKey)))
		real := make([]uint64, 300)
		for i := range real {
			real[i] = rng.Uint64()
			tb.Put(real[i], 1, 0, 1200)
			tb.Follow(real[i], 5, 1200, true)
			tb.Put(real[i], 1, 5, 1200)
		}
		requests, firstLoss := 0, -1
		for requests < 100*bound {
			if firstLoss < 0 && requests%bound < perKey {
				for _, k := range real {
					if e, ok := tb.Peek(k, 10); !ok || e.Upstream() != 1 {
						firstLoss = requests
						break
					}
				}
			}
			key := rng.Uint64()
			now := uint32(10 + requests/bound) // the attacker's clock goes on
			tb.Put(key, 2, now, 1200)
			for r := 1; r < perKey; r++ {
				// later requests of the key, seconds apart
				tb.Follow(key, now+uint32(r)*3, 1200, true)
				tb.Put(key, 2, now+uint32(r)*3, 1200)
			}
			requests += perKey
		}
		lost := 0
		for _, k := range real {
			if e, ok := tb.Peek(k, 200); !ok || e.Upstream() != 1 {
				lost++
			}
		}
		first := "none"
		if firstLoss >= 0 {
			first = fmt.Sprintf("the first after %d requests (%.1f × max_sessions)", firstLoss, float64(firstLoss)/bound)
		}
		t.Logf("max_sessions %d, 300 established sessions, %d requests in sessions of %d requests: %d established evicted, %s (%d evictions in all)",
			bound, requests, perKey, lost, first, tb.Evicted())
		if lost > 0 {
			t.Errorf("sessions of %d requests evicted %d of 300 established sessions", perKey, lost)
		}
		checkTable(t, tb)
	}
}

// A retired id (the app replaced it) stops counting as a session at
// once, and is still followed by a request whose first key it is until
// its grace ends.
func TestRetiredIDCountsNoMore(t *testing.T) {
	tb := NewTable(Shards * 10)
	tb.Put(1001, 7, 100, 600)
	tb.Put(1002, 7, 100, 600) // the id that replaced it
	if n := tb.LiveCount(7); n != 2 {
		t.Fatalf("live %d, want 2", n)
	}
	tb.Retire(1001, 130)
	if n := tb.LiveCount(7); n != 1 {
		t.Fatalf("live %d after the retirement, want 1", n)
	}
	if up, ok := tb.Follow(1001, 110, 0, true); !ok || up != 7 {
		t.Fatalf("the retired id within its grace: %d %v", up, ok)
	}
	if _, ok := tb.Follow(1001, 131, 0, true); ok {
		t.Fatal("the retired id after its grace is still followed")
	}
	checkTable(t, tb)
}

// recount counts the main entries per upstream the hard way.
func recount(tb *Table) map[uint32]int64 {
	counts := map[uint32]int64{}
	for i := range tb.shards {
		s := &tb.shards[i]
		s.mu.Lock()
		for _, e := range s.slots {
			if e.key != 0 && !e.Alias() {
				counts[e.Upstream()]++
			}
		}
		s.mu.Unlock()
	}
	return counts
}

func TestLiveCountsFollowTheTable(t *testing.T) {
	// Every way an entry comes, changes and goes, at random, on a small
	// table that evicts: the live counters always equal a recount, and
	// after a sweep they equal a recount of what it left.
	tb := NewTable(256 * 4)
	rng := rand.New(rand.NewPCG(7, 8))
	now := uint32(1000)
	for step := 0; step < 60000; step++ {
		key := rng.Uint64N(3000)
		up := uint32(rng.IntN(5))
		if rng.IntN(4) == 0 {
			up |= AliasBit
		}
		switch op := rng.IntN(10); {
		case op < 5:
			tb.Put(key, up, now, uint32(1+rng.IntN(30)))
		case op < 6:
			tb.Remove(key)
		case op < 7:
			tb.Retire(key, now+uint32(rng.IntN(3)))
		case op < 9:
			tb.Follow(key, now, uint32(rng.IntN(30)), rng.IntN(2) == 0)
		default:
			now += uint32(rng.IntN(3))
		}
		if step%5000 == 4999 {
			want := recount(tb)
			for id := uint32(0); id < 5; id++ {
				if got := tb.LiveCount(id); got != want[id] {
					t.Fatalf("step %d: upstream %d live count %d, recount %d", step, id, got, want[id])
				}
			}
			tb.Sweep(now)
			swept := recount(tb)
			for id := uint32(0); id < 5; id++ {
				if got := tb.LiveCount(id); got != swept[id] {
					t.Fatalf("step %d: after a sweep upstream %d live count %d, recount %d", step, id, got, swept[id])
				}
			}
		}
	}
	if tb.Evicted() == 0 {
		t.Fatal("the table never evicted: eviction is not exercised")
	}
	if tb.LiveCount(1<<20) != 0 {
		t.Fatal("an ID beyond the counted range has a count")
	}
}
