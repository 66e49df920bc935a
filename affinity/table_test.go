package affinity

import (
	"math/rand/v2"
	"testing"
)

func TestTableSlidingTTL(t *testing.T) {
	tb := newSessionTable(1000)
	tb.put(1, 7, 100, 60)
	if up, ok := tb.get(1, 150, 60); !ok || up != 7 {
		t.Fatalf("live entry: got %d, %v", up, ok)
	}
	// The get at 150 slid the expiry to 210.
	if _, ok := tb.get(1, 200, 0); !ok {
		t.Fatal("entry expired although it was touched within its TTL")
	}
	if _, ok := tb.get(1, 211, 60); ok {
		t.Fatal("entry outlived its TTL")
	}
	if tb.len() != 0 {
		t.Fatal("expired entry not deleted on read")
	}
}

func TestTableIsBoundedUnderRandomKeyFlood(t *testing.T) {
	const bound = 256 * 40
	tb := newSessionTable(bound)
	rng := rand.New(rand.NewPCG(1, 2))
	// A long-lived session, touched now and then, among a flood of
	// one-shot random keys (a client sending a new cookie every time).
	tb.put(42, 1, 0, 3600)
	for i := 0; i < 20*bound; i++ {
		tb.put(rng.Uint64(), 2, uint32(i/1000), 60)
		if i%500 == 0 {
			tb.get(42, uint32(i/1000), 3600)
		}
	}
	if n := tb.len(); n > bound {
		t.Fatalf("table holds %d entries, bound %d", n, bound)
	}
	if tb.evictions.Load() == 0 {
		t.Fatal("no eviction counted")
	}
	if up, ok := tb.get(42, 200, 0); !ok || up != 1 {
		t.Fatal("the flood evicted a live, recently used session with a long TTL")
	}
}

func TestTableSweepCounts(t *testing.T) {
	tb := newSessionTable(1000)
	for k := uint64(0); k < 30; k++ {
		tb.put(k, uint32(k%3), 0, uint32(10+k))
	}
	removed := tb.sweep(25) // keys with 10+k < 25 (k < 15) are expired
	counts := [3]int64{tb.liveCount(0), tb.liveCount(1), tb.liveCount(2)}
	total := counts[0] + counts[1] + counts[2]
	if removed != 15 || total != 15 || counts[0] != 5 {
		t.Fatalf("sweep removed %d, counts %v, want 15 removed, 15 live, 5 per upstream", removed, counts)
	}
	if tb.len() != 15 {
		t.Fatalf("sweep left %d entries, want 15", tb.len())
	}
	// An alias entry (another key of a session) is not a session.
	tb.put(100, 1|aliasBit, 25, 60)
	if up, ok := tb.get(100, 25, 0); !ok || up != 1 {
		t.Fatalf("alias entry reads as %d, %v; want upstream 1", up, ok)
	}
	if tb.sweep(25); tb.liveCount(1) != 5 {
		t.Fatalf("an alias entry was counted as a session: %d", tb.liveCount(1))
	}
}
