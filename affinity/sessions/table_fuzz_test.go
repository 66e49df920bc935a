package sessions

import "testing"

// FuzzTable runs table operations on keys that share one shard against a
// map model. Its seed corpus runs with the other tests.
func FuzzTable(f *testing.F) {
	f.Add([]byte{0, 1, 7, 0, 2, 7, 4, 1, 0, 3, 2, 9})
	f.Add([]byte{0, 5, 1, 0, 6, 1, 0, 7, 1, 6, 0, 3, 7, 0, 0, 3, 5, 30, 5, 6, 0})
	f.Add([]byte{1, 40, 2, 1, 41, 2, 1, 42, 2, 1, 43, 2, 4, 41, 0, 4, 40, 0, 2, 42, 9})
	f.Fuzz(runTableOps)
}

// modelEntry is what the model holds per key.
type modelEntry struct {
	up          uint32
	expires     uint32
	established bool
}

// runTableOps reads ops three bytes at a time (operation, key, argument)
// and applies each to a table, whose placement seed is fixed so that a
// failure repeats, and to a map; after each, the table must read as the
// map does and its shard must hold the invariants of linear probing. The
// 48 keys share a shard whose bound (100) they never reach, so nothing is
// evicted, every entry seen again is established (the shard's bound on
// established entries, 60, is out of reach too), and the array grows
// from 16 slots to 128.
func runTableOps(t *testing.T, ops []byte) {
	tb := NewTable(Shards * 100)
	tb.seed = [3]uint64{1, 2, 3}
	keys := keysInShard(tb, 0, 48)
	model := map[uint64]modelEntry{}
	now := uint32(100)
	for len(ops) >= 3 {
		op, key, arg := ops[0], keys[int(ops[1])%len(keys)], uint32(ops[2])
		ops = ops[3:]
		applyOp(tb, model, &now, op, key, arg)
		for _, k := range keys {
			checkKey(t, tb, model, k)
		}
		checkShard(t, tb, 0)
		if tb.Len() != len(model) {
			t.Fatalf("table holds %d entries, model %d", tb.Len(), len(model))
		}
	}
}

// applyOp applies one operation to the table and the model.
func applyOp(tb *Table, model map[uint64]modelEntry, now *uint32, op byte, key uint64, arg uint32) {
	m, had := model[key]
	switch op % 8 {
	case 0, 1, 2:
		up := arg % 5
		if arg&8 != 0 {
			up |= AliasBit
		}
		tb.Put(key, up, *now, arg%64)
		model[key] = modelEntry{up: up, expires: *now + arg%64, established: had && m.expires >= *now}
	case 3:
		aliases := arg&1 != 0
		tb.Follow(key, *now, arg%32, aliases)
		switch {
		case !had:
		case m.expires < *now:
			delete(model, key)
		case aliases || m.up&AliasBit == 0:
			m.established = true
			if arg%32 > 0 {
				m.expires = *now + arg%32
			}
			model[key] = m
		}
	case 4:
		tb.Remove(key)
		delete(model, key)
	case 5:
		tb.Retire(key, *now+arg%3)
		if had {
			m.up |= AliasBit // counts no more
			if m.expires > *now+arg%3 {
				m.expires = *now + arg%3
			}
			model[key] = m
		}
	case 6:
		*now += arg % 4
	case 7:
		tb.Sweep(*now)
		for k, m := range model {
			if m.expires < *now {
				delete(model, k)
			}
		}
	}
}

// checkKey compares key's slot in the table, expired or not, with the
// model.
func checkKey(t *testing.T, tb *Table, model map[uint64]modelEntry, key uint64) {
	t.Helper()
	h := tb.place(key)
	s := tb.shard(h)
	s.mu.Lock()
	i := s.find(key, h)
	var e Entry
	if i >= 0 {
		e = s.slots[i].Entry
	}
	s.mu.Unlock()
	m, ok := model[key]
	if (i >= 0) != ok {
		t.Fatalf("key %d: in the table %v, in the model %v", key, i >= 0, ok)
	}
	if ok && (e.up&^EstablishedBit != m.up || e.expires != m.expires || e.established() != m.established) {
		t.Fatalf("key %d: table %+v (established %v), model %+v", key, e, e.established(), m)
	}
}
