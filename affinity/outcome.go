package affinity

import (
	"github.com/caddy-affinity/caddy-affinity/healthcheck"
)

// outcome is what a decision did with its request: one row of outcomes.
type outcome uint8

const (
	outcomeNone     outcome = iota // no upstream may take it now
	outcomeRoute                   // the app's Tomcat route
	outcomePin                     // the pin cookie
	outcomeTable                   // the session table
	outcomePlaced                  // a new session, placed by the ring
	outcomeFailover                // a session whose upstream could not serve it, placed anew
	outcomeHeld                    // a session waiting for its upstream under hold
	outcomeOverflow                // its upstream is at max_requests: elsewhere once, the session stays
	numOutcomes
)

// outcomeRow is everything said of one outcome, wherever it is said.
type outcomeRow struct {
	// value is the request var {http.vars.affinity.decision}.
	value string
	// lookup is the decision GET /affinity/lookup names (Decided*).
	lookup string
	// label is the outcome label of caddy_affinity_selections_total.
	label string
	// words says what happened, for operators (the lookup's reason
	// starts from it).
	words string
}

// outcomes is the one table of outcomes.
var outcomes = [numOutcomes]outcomeRow{
	outcomeNone:     {"none", DecidedNone, "no_upstream", "no upstream may take it now (down, full, draining or in maintenance): Caddy retries per lb_try_duration, then answers 502"},
	outcomeRoute:    {"route", DecidedRoute, "pinned", "the session id's Tomcat route names an upstream that may serve it"},
	outcomePin:      {"pin", DecidedPin, "pinned", "a valid pin names an upstream that may serve it"},
	outcomeTable:    {"table", DecidedTable, "pinned", "the session table names an upstream that may serve it"},
	outcomePlaced:   {"placed", DecidedRing, "placed", "a new session: the ring walk places it"},
	outcomeFailover: {"failover", DecidedFailover, "failover", "its upstream cannot serve it: the session fails over to where the ring walk places it, and stays there"},
	outcomeHeld:     {"held", DecidedHold, "held", "its upstream is in trouble: under hold its requests wait for it to come back, then fail over"},
	outcomeOverflow: {"overflow", DecidedOverflow, "overflow", "its upstream is at max_requests: busy is not down, this request goes elsewhere once and the session stays"},
}

// String names the outcome: the value of {http.vars.affinity.decision}.
func (o outcome) String() string { return outcomes[o].value }

// outcome returns what the decision does with its request.
func (d *decision) outcome() outcome {
	switch {
	case d.held:
		return outcomeHeld
	case d.chosen < 0:
		return outcomeNone
	case d.by == fromRoute:
		return outcomeRoute
	case d.by == fromPin:
		return outcomePin
	case d.by == fromTable:
		return outcomeTable
	case d.overflow():
		return outcomeOverflow
	case d.failover():
		return outcomeFailover
	}
	return outcomePlaced
}

// left returns the upstream the session leaves and why: the first source
// asked that named an upstream which could not serve it, else the
// upstream that failed this request; -1 for a session that had none (a
// new one).
func (d *decision) left() (int, healthcheck.Verdict) {
	for _, a := range d.asked[:d.nasked] {
		if a.verdict != healthcheck.Serves && a.verdict != healthcheck.Full && !a.stale {
			return a.upstream, a.verdict
		}
	}
	return d.failed, healthcheck.Failed
}

// leftDial names the upstream the session leaves and why: one of the
// pool's, or one a reload removed.
func (d *decision) leftDial(ps *poolState) (string, healthcheck.Verdict) {
	if from, why := d.left(); from >= 0 {
		return ps.Ups[from].Dial, why
	}
	return d.gone, healthcheck.Removed
}

// overflow reports whether the request goes elsewhere once because its
// session's upstream is at max_requests: the session is not moved.
func (d *decision) overflow() bool {
	return d.by == fromRing && !d.held && d.chosen >= 0 && d.busy >= 0
}

// failover reports whether the ring placed a session that had an upstream
// on another one.
func (d *decision) failover() bool {
	if d.by != fromRing || d.held || d.chosen < 0 || d.overflow() {
		return false
	}
	from, _ := d.left()
	return (from >= 0 && from != d.chosen) || (from < 0 && d.gone != "")
}
