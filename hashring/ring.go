// Package hashring maps key hashes to a weighted set of members so that
// the same key keeps landing on the same member, and few keys move when
// the set changes. It is the placement half of session affinity: which
// upstream a new session belongs to, and where it goes if that one is down.
//
// # Why a Maglev table and not a ring
//
// The structure is a Maglev lookup table (Eisenbud et al., "Maglev: A
// Fast and Reliable Software Network Load Balancer", NSDI 2016), not a
// classic ring of virtual points. With V points per member a ring gives
// each member a share whose relative standard deviation is about 1/√V:
// ≈3% for V = 1000, so among 64 members the busiest one carries ~8% more
// than the mean, and a peak/mean of 1.02 is out of reach without tens of
// thousands of points per member. A Maglev table of M slots hands each
// equally weighted member exactly ⌊M/N⌋ or ⌈M/N⌉ slots, so the only
// imbalance left is the randomness of the keys themselves, and a lookup is
// one multiply and one array load instead of a binary search.
//
// The table size is fixed at the prime M = 131071 (TableSize): adding a
// member never changes M, so it never reshuffles the table wholesale, and
// every member keeps at least 100 slots up to N = 1000 (more slots per
// member means finer weights and less disruption on change). Entries are
// uint16, which caps a ring at 65535 members and keeps the table at 256 KiB.
//
// The table is filled from the paper's per-member permutations, but in a
// slightly different order, which moves fewer keys when members come and
// go; see populate for the details.
//
// # Failover without rebuilding
//
// A member that is temporarily unusable (unhealthy, draining) is not
// removed from the table: callers Walk the probe order from the key's slot
// and take the first member they can use. Keys of other members never
// move, and when the member comes back its keys return to it, because the
// table itself never changed.
//
// # Determinism
//
// The table depends only on the set of (name, weight) pairs: members are
// sorted by name before population, the permutations come from xxh3 with
// fixed seeds, and building and lookup use integer arithmetic only. Every
// process on every machine that is given the same members therefore sends
// every key to the same member, whatever order the members were listed in.
package hashring

import (
	"cmp"
	"errors"
	"fmt"
	"math"
	"math/bits"
	"slices"
	"strings"
)

// TableSize is the number of slots in every Ring's lookup table, M in the
// Maglev paper. It is prime, so that every skip in [1, M-1] generates a
// full permutation of the slots.
const TableSize = 131071

// MaxMembers is the largest number of members a Ring can hold: table
// entries are uint16 member positions.
const MaxMembers = math.MaxUint16

// Fixed seeds for the two hashes that define a member's permutation of the
// slots. They are part of the mapping: changing them moves every key.
const (
	seedOffset = 0x6d61676c65762d6f // "maglev-o"
	seedSkip   = 0x6d61676c65762d73 // "maglev-s"
)

// Member is one target of a Ring.
type Member struct {
	// Name identifies the member, for example an upstream dial address.
	// It must be non-empty and unique within a Ring, and it alone decides
	// where the member's slots fall.
	Name string
	// Weight is the member's relative share of keys. 0 means the member
	// owns no slots and takes no keys; otherwise its share of the table is
	// Weight divided by the sum of all weights, to within a few slots of
	// TableSize (exactly ⌊M/N⌋ or ⌈M/N⌉ slots when all weights are equal).
	Weight int
}

// Ring is an immutable Maglev lookup table over a set of members. It is
// safe for concurrent use. Member indexes in its API (results of Lookup
// and Walk, arguments of Share and Member) are positions in the slice that
// was given to New.
type Ring struct {
	// The fields below depend only on the member set, and are shared by
	// rings that differ only in the order members were listed in.
	slots    *[TableSize]uint16 // slot → sorted position; nil if no member has weight
	sorted   []Member           // members sorted by name
	owned    []uint32           // slots owned, by sorted position
	weighted int                // members with Weight > 0

	// The fields below translate between the name order used inside and
	// the caller's order.
	members []Member // in the caller's order
	pos     []uint16 // caller index → sorted position
	idx     []uint16 // sorted position → caller index
}

// New builds a Ring over members. It returns an error if a name is empty
// or repeated, a weight is negative, or there are more than MaxMembers
// members. A Ring with no members, or none with positive weight, is valid:
// its Lookup returns -1 and its Walk yields nothing.
//
// The mapping depends only on the set of (Name, Weight) pairs, not on
// their order in members; only the indexes the Ring reports follow that
// order. New does not keep a reference to members.
func New(members []Member) (*Ring, error) {
	if len(members) > MaxMembers {
		return nil, fmt.Errorf("hashring: %d members, at most %d allowed", len(members), MaxMembers)
	}
	for _, m := range members {
		if m.Name == "" {
			return nil, errors.New("hashring: member with empty name")
		}
		if m.Weight < 0 {
			return nil, fmt.Errorf("hashring: member %q has negative weight %d", m.Name, m.Weight)
		}
	}

	// Sort by name so the table does not depend on the caller's order.
	idx := make([]uint16, len(members))
	for i := range idx {
		idx[i] = uint16(i)
	}
	slices.SortFunc(idx, func(a, b uint16) int {
		return strings.Compare(members[a].Name, members[b].Name)
	})
	sorted := make([]Member, len(members))
	for p, i := range idx {
		sorted[p] = members[i]
		if p > 0 && sorted[p-1].Name == sorted[p].Name {
			return nil, fmt.Errorf("hashring: duplicate member name %q", sorted[p].Name)
		}
	}

	r := &Ring{sorted: sorted, owned: make([]uint32, len(members))}
	r.populate()
	r.setOrder(members, idx)
	return r, nil
}

// setOrder records the caller's member order: idx lists the caller's
// indexes in name order.
func (r *Ring) setOrder(members []Member, idx []uint16) {
	r.members = slices.Clone(members)
	r.idx = idx
	r.pos = make([]uint16, len(idx))
	for p, i := range idx {
		r.pos[i] = uint16(p)
	}
}

// weightBits bounds the weights used in arithmetic, so that every
// product fits in 64 bits: M (< 2^17) × weight (< 2^31), the sum of up to
// 65535 weights, and a round number (< M·2^31) next to a 16-bit class
// number in a heap key.
const weightBits = 31

// builder is a member's state while the table is being populated.
type builder struct {
	next   uint32 // next slot of the member's permutation
	skip   uint32 // step between slots of the permutation, in [1, M-1]
	need   uint32 // slots still to claim: the quota, at first
	pos    uint16 // sorted position, the value written into the table
	weight uint64 // scaled to weightBits
}

// class is the members of one weight. They share a schedule: each
// examines one entry every maxWeight/weight rounds. frac/weight is the
// part of a round rounded off to get to the next (due) one.
type class struct {
	frac         uint64
	step, stepFr uint64  // maxWeight / weight and maxWeight % weight
	weight       uint64  // scaled to weightBits
	live         []int32 // members still under quota, in turn order
}

// populate fills r.slots from r.sorted.
//
// Every member has its own permutation of the slots, as in the Maglev
// paper: from a hashed offset in steps of a hashed skip, modulo M; M is
// prime, so this visits every slot once. Members take turns, heavier ones
// first and then by name; in each turn a member examines the next entry
// of its permutation and claims that slot if nobody holds it yet.
// Weighted members examine entries at a rate proportional to weight, in
// the manner of Envoy's Maglev: the heaviest take a turn every round, one
// of a third of their weight every third round. A member stops once it
// holds its quota, its weight's share of M (see setQuotas), so slot
// counts are set by weight, not by the luck of the permutations.
//
// This differs from the paper, where a turn probes on past taken slots
// until it claims one. There, each claim depends on every claim made
// before it, so a member more or less perturbs the whole fill. Here, a
// slot goes to the member that ranks it earliest in its permutation
// (relative to its rate), as in rendezvous hashing, unless that member
// already holds its quota. A change of members then moves the slots the
// member wins or held, plus what evening out the quotas takes. Measured
// against the minimum (1/(N+1) of the keys to move when adding to N
// members), that is 1.00× at N = 3, 1.03× at N = 16 and 1.12× at N = 64,
// where the paper's order gives 1.00×, 1.04× and 1.21×. Balance is the
// same, exact, and so is the cost: about M·ln(M) examined entries.
func (r *Ring) populate() {
	var maxWeight uint64
	for _, m := range r.sorted {
		maxWeight = max(maxWeight, uint64(m.Weight))
	}
	if maxWeight == 0 {
		return // no member takes keys: no table
	}
	// Scale huge weights down to weightBits bits. That changes no share by
	// more than about 2^-31, far below one slot of 2^-17, and a positive
	// weight stays positive.
	shift := max(0, bits.Len64(maxWeight)-weightBits)
	maxWeight >>= shift

	bs := make([]builder, 0, len(r.sorted))
	var sum uint64
	for p, m := range r.sorted {
		if m.Weight == 0 {
			continue
		}
		w := max(1, uint64(m.Weight)>>shift)
		sum += w
		bs = append(bs, builder{
			next:   uint32(HashStringSeed(m.Name, seedOffset) % TableSize),
			skip:   uint32(HashStringSeed(m.Name, seedSkip)%(TableSize-1) + 1),
			pos:    uint16(p),
			weight: w,
		})
	}
	r.weighted = len(bs)
	// Turn order: heavier first, then by name (bs is by name already).
	slices.SortStableFunc(bs, func(a, b builder) int { return cmp.Compare(b.weight, a.weight) })
	setQuotas(bs, sum)
	for _, b := range bs {
		r.owned[b.pos] = b.need
	}

	// Group the members into classes of equal weight, in turn order, and
	// keep the classes in a min-heap of due<<16 | class: the top is the
	// class whose turn is next, and in a round classes go in turn order.
	// All are due in round 1, in order, which is a valid heap. Most rings
	// have one or two classes, so this is cheap; it keeps rings with many
	// distinct weights from visiting every member every round.
	live := make([]int32, len(bs))
	var classes []class
	var heap []uint64
	start := 0 // of the current class in bs
	for i := range bs {
		live[i] = int32(i)
		if i+1 == len(bs) || bs[i+1].weight != bs[i].weight {
			w := bs[i].weight
			heap = append(heap, 1<<16|uint64(len(classes)))
			classes = append(classes, class{
				step:   maxWeight / w,
				stepFr: maxWeight % w,
				weight: w,
				live:   live[start : i+1 : i+1],
			})
			start = i + 1
		}
	}

	// used marks claimed slots: 16 KiB that stay in L1 cache, where the
	// table itself (256 KiB) would not, while members probe.
	var used [(TableSize + 63) / 64]uint64
	t := new([TableSize]uint16)
	for len(heap) > 0 {
		due, c := heap[0]>>16, &classes[heap[0]&0xffff]
		live := c.live
		k := 0
		for _, i := range live {
			// Examine entry s. To find the next one, no %: s and skip are
			// both below M, so one subtraction wraps the sum.
			b := &bs[i]
			s := b.next
			next := s + b.skip
			if next >= TableSize {
				next -= TableSize
			}
			b.next = next
			if used[s/64]&(1<<(s%64)) == 0 {
				used[s/64] |= 1 << (s % 64)
				t[s] = b.pos
				if b.need--; b.need == 0 {
					continue // done: drop from live
				}
			}
			// A member under quota always finds a free slot within M more
			// entries: the quotas sum to M, and every slot it passed is taken.
			live[k] = i
			k++
		}
		c.live = live[:k]
		if k == 0 {
			heap[0] = heap[len(heap)-1]
			heap = heap[:len(heap)-1]
		} else {
			due += c.step
			if c.frac += c.stepFr; c.frac >= c.weight {
				c.frac -= c.weight
				due++
			}
			heap[0] = due<<16 | heap[0]&0xffff
		}
		siftDown(heap)
	}
	r.slots = t
}

// siftDown restores the order of heap, a binary min-heap, after its top
// entry changed.
func siftDown(heap []uint64) {
	for i := 0; ; {
		j := 2*i + 1
		if j >= len(heap) {
			return
		}
		if j+1 < len(heap) && heap[j+1] < heap[j] {
			j++
		}
		if heap[i] <= heap[j] {
			return
		}
		heap[i], heap[j] = heap[j], heap[i]
		i = j
	}
}

// setQuotas gives each member its share of the M slots: one each, so
// that every weighted member is reachable by Walk, and the remaining
// M - len(bs) in proportion to weight by the largest-remainder method,
// ties going to the member first in turn order. With equal weights that
// is ⌊M/N⌋ or ⌈M/N⌉ each; otherwise a member's count is within one slot
// of its exact share, plus the one reserved slot's effect (1 - n·w/Σw
// slots, which matters only for weights far above the mean).
func setQuotas(bs []builder, sum uint64) {
	spare := uint64(TableSize - len(bs))
	left := uint32(spare)
	order := make([]int, len(bs))
	rem := make([]uint64, len(bs))
	for i := range bs {
		bs[i].need = 1 + uint32(spare*bs[i].weight/sum)
		rem[i] = spare * bs[i].weight % sum
		left -= bs[i].need - 1
		order[i] = i
	}
	slices.SortStableFunc(order, func(a, b int) int {
		return cmp.Compare(rem[b], rem[a])
	})
	for _, i := range order[:left] {
		bs[i].need++
	}
}

// slot maps a key hash to a table slot. Taking the high word of h·M
// spreads the full 64-bit range evenly over [0, M) and is much cheaper
// than h % M.
func slot(h uint64) uint64 {
	s, _ := bits.Mul64(h, TableSize)
	return s
}

// Len returns the number of members the Ring was built with, including
// those with weight 0.
func (r *Ring) Len() int {
	if r == nil {
		return 0
	}
	return len(r.members)
}

// Member returns the member at index i, in the order the Ring was given
// its members. It panics if i is out of range.
func (r *Ring) Member(i int) Member {
	return r.members[i]
}

// Lookup returns the index of the member that owns key hash h, or -1 if
// no member has positive weight.
func (r *Ring) Lookup(h uint64) int {
	if r == nil || r.slots == nil {
		return -1
	}
	return int(r.idx[r.slots[slot(h)]])
}

// Walk calls yield with the members in the probe order of key hash h:
// first Lookup(h), then the owners of the following slots, wrapping at
// the end of the table, each member once. Only members with positive
// weight are yielded. Walk stops when yield returns false or when every
// such member has been yielded.
//
// The probe order is the failover order: a caller that cannot use a
// member takes the next one. Because slots are interleaved among all
// members, the keys of an unusable member spread over the others,
// roughly in proportion to their slots, rather than piling onto one.
//
// Walk does not allocate for rings of up to 1024 members.
func (r *Ring) Walk(h uint64, yield func(member int) bool) {
	if r == nil || r.slots == nil {
		return
	}
	// A bitset of the sorted positions already yielded; on the stack for
	// small rings.
	var buf [1024 / 64]uint64
	seen := buf[:]
	if n := len(r.sorted); n > 1024 {
		seen = make([]uint64, (n+63)/64)
	}
	left := r.weighted
	s := slot(h)
	// Every weighted member owns a slot, so one pass over the table
	// yields them all; the bound only guards against a broken table.
	for range TableSize {
		p := r.slots[s]
		if seen[p/64]&(1<<(p%64)) == 0 {
			seen[p/64] |= 1 << (p % 64)
			if !yield(int(r.idx[p])) {
				return
			}
			if left--; left == 0 {
				return
			}
		}
		if s++; s == TableSize {
			s = 0
		}
	}
}

// Share returns the fraction of table slots, and so of uniformly hashed
// keys, owned by the member at index i. It panics if i is out of range.
func (r *Ring) Share(i int) float64 {
	return float64(r.owned[r.pos[i]]) / TableSize
}
