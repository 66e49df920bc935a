package healthcheck

import "time"

// Order is the last lifecycle state an operator set for an upstream,
// through this instance's admin API or through one that shares its
// Caddy storage or Redis: what the status page shows as "set by ... at
// ...".
type Order struct {
	// State is the state the operator asked for.
	State State
	// Since is when (the newest order wins).
	Since time.Time
	// By names the instance whose admin API took it: host name / Caddy
	// instance ID.
	By string
}

// LastOrder returns the last operator order for the upstream; ok is
// false when no operator ever set its state (it may still be draining
// on the probe's word: see SetBy).
func (u *Upstream) LastOrder() (o Order, ok bool) {
	op := u.operator.Load()
	if op == nil {
		return Order{}, false
	}
	return Order{State: op.State, Since: time.Unix(0, op.Since), By: op.By}, true
}
