package hashring

import "sync/atomic"

// Live holds the current Ring for a member set that changes over time.
// Readers get the current snapshot with one atomic load and no lock; the
// snapshot is immutable, so they may keep using it while an Update
// installs a newer one. The zero value holds no Ring.
type Live struct {
	ring atomic.Pointer[Ring]
}

// Load returns the current Ring, or nil before the first successful
// Update.
func (l *Live) Load() *Ring {
	return l.ring.Load()
}

// Update makes members the current member set and returns the Ring for
// it. The table is rebuilt, and rebuilt reports true, only if the set of
// (Name, Weight) pairs differs from the current Ring's; comparing as sets
// means a reordered list does not cost a rebuild.
//
// The returned Ring's indexes always refer to members as given here. So
// when members is the current set in a different order, Update stores
// and returns a Ring that shares the current table but reports indexes
// in the new order (rebuilt is false: no key moves).
//
// If members is invalid (see New), Update returns the error and leaves
// the current Ring in place. Concurrent Updates are safe; the last one to
// store wins.
func (l *Live) Update(members []Member) (r *Ring, rebuilt bool, err error) {
	cur := l.ring.Load()
	if cur != nil {
		if same, idx := cur.sameSet(members); same {
			if idx == nil {
				return cur, false, nil
			}
			v := *cur
			v.setOrder(members, idx)
			l.ring.Store(&v)
			return &v, false, nil
		}
	}
	r, err = New(members)
	if err != nil {
		return nil, false, err
	}
	l.ring.Store(r)
	return r, true, nil
}
