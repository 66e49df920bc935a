package affinity

import (
	"errors"
	"fmt"
	"math"
	"slices"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"
	"go.uber.org/zap"
	"golang.org/x/net/http/httpguts"

	"github.com/caddy-affinity/caddy-affinity/affinity/keys"
	"github.com/caddy-affinity/caddy-affinity/affinity/pin"
	"github.com/caddy-affinity/caddy-affinity/affinity/sessions"
)

// The config is checked in one place, Validate, whether it came from a
// Caddyfile or from JSON. The Caddyfile parser reads the syntax (how
// many arguments, what is a number or a duration) and records where
// each option was written; it then asks Validate, and a broken rule is
// reported at the line of the option that breaks it (configError.at).
// So `caddy adapt` fails on every rule with its line, and `caddy run`
// of JSON fails on the same rules with the option's name.

// Bounds of sizes and factors that Validate enforces besides the
// durations' (maxSessionTTL and the others, next to the defaults).
const (
	// maxMaxSessions is the most sessions a table may be sized for: at
	// about 21 bytes a session, 100 million take 2 GB of memory.
	maxMaxSessions = 100_000_000
	// maxBalanceFactor is the largest balance_factor: an upstream's
	// bound is c times its share of the sessions, so with c at or above
	// the number of upstreams no upstream ever reaches it; past 100 the
	// bound means nothing for any farm.
	maxBalanceFactor = 100
)

// configError is a rule of the config broken by one option. at names
// the option as the Caddyfile parser records it (see optionAt); the
// error's text names the option itself, for JSON configs.
type configError struct {
	at  string
	err error
}

func (e *configError) Error() string { return e.err.Error() }
func (e *configError) Unwrap() error { return e.err }

// broken returns the error for a rule broken by the option at.
func broken(at string, format string, args ...any) error {
	return &configError{at: at, err: fmt.Errorf(format, args...)}
}

// optionAt names an option, or one of several options of one name, for
// the line record: "key#2", "tomcat_route node1", "pin_cookie secure".
func optionAt(opt string, which ...any) string {
	for _, w := range which {
		switch w := w.(type) {
		case int:
			opt += fmt.Sprintf("#%d", w)
		default:
			opt += fmt.Sprintf(" %v", w)
		}
	}
	return opt
}

// Validate checks the configuration: every rule of it, in one place. It
// does not change the policy: defaults (the pin cookie's name, the
// platform keys) are checked as they will apply.
func (p *Policy) Validate() error {
	for _, check := range []func() error{
		p.validateKeys, p.validatePin, p.validateSecrets, p.validateSizes,
		p.validatePlacement, p.validateParts,
	} {
		if err := check(); err != nil {
			return err
		}
	}
	return nil
}

// keysInEffect returns the keys the policy reads: its own, or the
// platform cookies when it has none and no `key none`.
func (p *Policy) keysInEffect() []keys.Source {
	if len(p.Keys) == 0 && !p.NoDefaultKeys {
		return keys.Defaults()
	}
	return p.Keys
}

// pinCookieName returns the pin cookie's name as it will apply.
func (p *Policy) pinCookieName() string {
	if p.PinCookie == "" {
		return DefaultPinCookie
	}
	return p.PinCookie
}

func (p *Policy) validateKeys() error {
	if len(p.Keys) > keys.Max {
		return broken(optionAt("key", keys.Max), "key: at most %d key lines, got %d", keys.Max, len(p.Keys))
	}
	if p.NoDefaultKeys && len(p.Keys) > 0 {
		return broken("key none", "key none (no_default_keys) goes with no other key line: drop one or the other")
	}
	for i := range p.Keys {
		k := p.Keys[i] // a copy: provision fills in defaults
		if err := k.Provision(); err != nil {
			return broken(optionAt("key", i), "%v", err)
		}
	}
	if p.DisablePinCookie && len(p.keysInEffect()) == 0 {
		return broken("pin_cookie", "pin_cookie off with key none: nothing would tell sessions apart; give a key line (key cookie <the app's session cookie>), or keep the pin cookie")
	}
	return nil
}

func (p *Policy) validatePin() error {
	if p.DisablePinCookie {
		if p.PinCookieAttributes != nil {
			return broken("pin_cookie", "pin_cookie: attributes are given but the pin cookie is off")
		}
		return nil
	}
	pin := p.pinCookieName()
	if !validCookieName(pin) {
		return broken("pin_cookie", "pin_cookie: %q is not a valid cookie name", pin)
	}
	if err := p.validatePinAttributes(); err != nil {
		return err
	}
	// The pin is the proxy's cookie: one the keys read is the app's, and
	// issuing the pin under its name would overwrite the app's session.
	inEffect := p.keysInEffect()
	for i := range inEffect {
		k := inEffect[i]
		if k.Provision() != nil || !k.ReadsCookie(pin) {
			continue
		}
		if len(p.Keys) == 0 {
			return broken("pin_cookie", "pin_cookie %s: the default keys (%s) read that cookie, the app's session cookie, which the pin would overwrite; name the pin something else (the default is %s)",
				pin, k.String(), DefaultPinCookie)
		}
		return broken(optionAt("key", i), "key %s: reads the pin cookie %s, which the proxy writes; key on the app's session cookie, or rename the pin with pin_cookie <name>",
			k.String(), pin)
	}
	return nil
}

// validatePinAttributes checks each pin cookie attribute on its own (so
// the error names its line), then their combination.
func (p *Policy) validatePinAttributes() error {
	a := p.PinCookieAttributes
	if a == nil {
		return nil
	}
	for _, one := range []struct {
		name string
		only pin.Attributes
	}{
		{"domain", pin.Attributes{Domain: a.Domain}},
		{"path", pin.Attributes{Path: a.Path}},
		{"same_site", pin.Attributes{SameSite: a.SameSite}},
		{"secure", pin.Attributes{Secure: a.Secure}},
		{"max_age", pin.Attributes{MaxAge: a.MaxAge}},
	} {
		if _, err := one.only.Style(); err != nil {
			return &configError{at: optionAt("pin_cookie", one.name), err: err}
		}
	}
	if _, err := a.Style(); err != nil {
		at := "pin_cookie"
		if errors.Is(err, pin.ErrSecureAuto) {
			at = optionAt("pin_cookie", "secure")
		}
		return &configError{at: at, err: err}
	}
	return nil
}

func (p *Policy) validateSecrets() error {
	for i, prev := range p.PreviousSecrets {
		if prev == "" || prev == p.Secret || slices.Contains(p.PreviousSecrets[:i], prev) {
			return broken("secret", "secret: previous secret %d is empty, given twice, or the same as the current secret", i+1)
		}
	}
	if len(p.PreviousSecrets) > pin.MaxPreviousSecrets {
		return broken("secret", "secret: at most %d previous secrets, got %d (each costs a token comparison on a pin of no current upstream)", pin.MaxPreviousSecrets, len(p.PreviousSecrets))
	}
	return nil
}

func (p *Policy) validateSizes() error {
	if ttl := time.Duration(p.SessionTTL); ttl != 0 && (ttl < time.Second || ttl > maxSessionTTL) {
		return broken("session_ttl", "session_ttl: %s is not between 1s and %s", ttl, maxSessionTTL)
	}
	if n := p.MaxSessions; n != 0 && (n < minMaxSessions || n > maxMaxSessions) {
		return broken("max_sessions", "max_sessions: %d is not between %d (the session table has %d shards) and %d (about 2 GB of memory)",
			n, minMaxSessions, sessions.Shards, maxMaxSessions)
	}
	for _, d := range []struct {
		name     string
		val, max time.Duration
	}{{"hold", time.Duration(p.Hold), maxHold}, {"slow_start", time.Duration(p.SlowStart), maxSlowStart}} {
		if d.val < 0 || d.val > d.max {
			return broken(d.name, "%s: %s is not between 0 and %s", d.name, d.val, d.max)
		}
	}
	for i, w := range p.Weights {
		if w < 0 {
			return broken("weights", "weights: weight %d (upstream %d) is negative", w, i+1)
		}
	}
	return nil
}

func (p *Policy) validatePlacement() error {
	if c := p.BalanceFactor; c != 0 {
		if !(c > 1) || !(c <= maxBalanceFactor) || math.IsInf(c, 0) {
			return broken("balance_factor", "balance_factor: %v is not more than 1 and at most %d (1.25 is a sensible value)", c, maxBalanceFactor)
		}
		if len(p.keysInEffect()) == 0 {
			return broken("balance_factor", "balance_factor needs a key: live sessions are counted in the session table, by key")
		}
	}
	if len(p.TomcatRoutes) == 0 {
		return nil
	}
	routes := make([]string, 0, len(p.TomcatRoutes))
	for route := range p.TomcatRoutes {
		routes = append(routes, route)
	}
	slices.Sort(routes)
	if !p.readsTomcatRoutes() {
		return broken(optionAt("tomcat_route", routes[0]), errTomcatRouteKey)
	}
	for _, route := range routes {
		if dial := p.TomcatRoutes[route]; route == "" || dial == "" || !validRoute(route) {
			return broken(optionAt("tomcat_route", route), "tomcat_route: route %q and upstream %q must both be given, and the route have no space, ';', ',' or '='", route, dial)
		}
	}
	return nil
}

func (p *Policy) validateParts() error {
	if err := p.Store.Validate(); err != nil {
		return &configError{at: "store", err: err}
	}
	if p.Probe != nil {
		if err := p.Probe.Validate(); err != nil {
			return &configError{at: "probe", err: err} // it says "probe: ..." itself
		}
	}
	return nil
}

// readsTomcatRoutes reports whether a key of the policy carries a Java
// session id, from which tomcat_route reads the route.
func (p *Policy) readsTomcatRoutes() bool {
	for _, k := range p.keysInEffect() {
		if k.CarriesRoute() {
			return true
		}
	}
	return false
}

// proxyNamed names a reverse_proxy by its upstreams, so that an error
// found when the config loads (without the Caddyfile's lines) says which
// one it is about.
func proxyNamed(h *reverseproxy.Handler) string {
	if h.DynamicUpstreams != nil {
		return "dynamic upstreams"
	}
	var dials []string
	for _, u := range h.Upstreams {
		dials = append(dials, u.Dial)
	}
	if len(dials) > 3 {
		dials = append(dials[:3], "...")
	}
	if len(dials) == 0 {
		return "no upstreams"
	}
	return "to " + strings.Join(dials, ", ")
}

// checkHandler checks what the policy needs of its reverse_proxy, which
// Provision finds among the modules that provision it: hold waits for a
// pinned upstream by Caddy's retries, which only lb_try_duration makes.
// The Caddyfile parser sees only the policy's block, so this is checked
// when the config loads (caddy run, caddy validate, caddy adapt
// --validate).
func (p *Policy) checkHandler(ctx caddy.Context) error {
	if p.Hold <= 0 {
		return nil
	}
	mods := ctx.Modules()
	for i := len(mods) - 1; i >= 0; i-- {
		h, ok := mods[i].(*reverseproxy.Handler)
		if !ok {
			continue
		}
		var try time.Duration
		if h.LoadBalancing != nil {
			try = time.Duration(h.LoadBalancing.TryDuration)
		}
		hold := time.Duration(p.Hold)
		if try <= 0 {
			return fmt.Errorf("hold %s needs retries: a held request waits for its upstream by Caddy's retries, and this reverse_proxy (%s) has no lb_try_duration; add `lb_try_duration %s` (at least the hold) next to lb_policy", hold, proxyNamed(h), hold)
		}
		if try < hold {
			p.logger.Warn("lb_try_duration is shorter than hold: a request waits at most lb_try_duration for its held upstream, and then fails rather than failing over; make lb_try_duration at least the hold",
				zap.Duration("hold", hold), zap.Duration("lb_try_duration", try))
		}
		return nil
	}
	return nil
}

// validRoute reports whether route can be a Tomcat jvmRoute suffix as a
// session id carries it.
func validRoute(route string) bool { return !strings.ContainsAny(route, " ;,=") }

// errTomcatRouteKey is the error for tomcat_route lines without a key
// that carries a Java session id.
const errTomcatRouteKey = "tomcat_route needs a `key cookie` or `key path_param` line: the route is read from that session id"

// validCookieName reports whether s is a cookie name: an RFC 6265
// cookie-name is an RFC 7230 token, the same rule as a header field name.
func validCookieName(s string) bool { return httpguts.ValidHeaderFieldName(s) }

// Bounds of durations and sizes. Times in the table are uint32 seconds,
// and a hold's incident window is 2 × hold: the bounds keep both far from
// overflowing, and no app keeps an idle session longer than a year.
const (
	maxSessionTTL  = 365 * 24 * time.Hour
	maxHold        = time.Hour
	maxSlowStart   = 24 * time.Hour
	minMaxSessions = sessions.Shards
)
