package affinity

import (
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"

	"github.com/caddy-affinity/caddy-affinity/healthcheck"

	"github.com/caddy-affinity/caddy-affinity/affinity/keys"
	"github.com/caddy-affinity/caddy-affinity/affinity/pin"
	"github.com/caddy-affinity/caddy-affinity/affinity/sessions"
)

// UnmarshalCaddyfile sets up the policy from Caddyfile tokens. Syntax:
//
//	lb_policy affinity {
//		key cookie <name>
//		key header <name>
//		key query <name>
//		key client_ip [<v4 bits> [<v6 bits>]]
//		key path_param <name>
//		key aspnet_cookieless
//		key platform_cookies
//		key none
//		pin_cookie [<name>] [{
//			domain <domain>
//			path <path>
//			same_site lax|strict|none
//			secure auto|always
//			max_age <duration>
//			partitioned
//		}]
//		pin_cookie off
//		secret <current> [<previous>...]
//		session_ttl <duration>
//		max_sessions <n>
//		weights <w1> [<w2>...]
//		hold <duration>
//		slow_start <duration>
//		balance_factor <c>
//		tomcat_route <route> <upstream dial address>
//		scope <name>
//		store local [{ interval <duration> }] | memory | redis <host:port> [{ ... }]
//		probe [<path>] {
//			path <path>
//			interval <duration>
//			timeout <duration>
//			passes <n>
//			fails <n>
//			drain_status <code> | off
//			drain_header <name>
//		}
//	}
//
// Several key lines are tried in the order given; so are several
// tomcat_route lines, one per route. Every error names the file and line
// (the dispenser adds them).
func (p *Policy) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // the policy name
	lines := optionLines{"": d.WrapErr}
	if d.NextArg() {
		return d.Errf("affinity takes no arguments on the lb_policy line, got %q; options go in a block", d.Val())
	}
	if err := p.parseOptions(d, lines); err != nil {
		return err
	}
	// The rules: Validate, reported at the line of the option that
	// breaks them.
	return lines.at(p.Validate())
}

// optionLines records where each option was written: for an option (as
// optionAt names it), a function that puts its file and line on an
// error. "" is the lb_policy line, for rules broken by defaults.
type optionLines map[string]func(error) error

// note records the current line as where option at was written.
func (l optionLines) note(d *caddyfile.Dispenser, at string) {
	if _, ok := l[at]; ok {
		return
	}
	file, line := d.File(), d.Line()
	l[at] = func(err error) error { return fmt.Errorf("%w, at %s:%d", err, file, line) }
}

// at puts the line of the option that broke a rule on Validate's error.
func (l optionLines) at(err error) error {
	var ce *configError
	if err == nil || !errors.As(err, &ce) {
		return err
	}
	if wrap, ok := l[ce.at]; ok {
		return wrap(err)
	}
	if opt, _, ok := strings.Cut(ce.at, "#"); ok && l[opt] != nil {
		return l[opt](err)
	}
	if opt, _, ok := strings.Cut(ce.at, " "); ok && l[opt] != nil {
		return l[opt](err)
	}
	return l[""](err)
}

// parseOptions reads the block's options: their syntax only.
func (p *Policy) parseOptions(d *caddyfile.Dispenser, lines optionLines) error {
	seen := make(map[string]bool)
	for d.NextBlock(0) {
		opt := d.Val()
		if opt != "key" && opt != "tomcat_route" && seen[opt] {
			return d.Errf("%s specified more than once", opt)
		}
		seen[opt] = true
		lines.note(d, opt)
		switch opt {
		case "key":
			if d.CountRemainingArgs() == 1 {
				if d.NextArg(); d.Val() == "none" {
					if p.NoDefaultKeys {
						return d.Err("key none specified more than once")
					}
					lines.note(d, "key none")
					p.NoDefaultKeys = true
					break
				}
				d.Prev()
			}
			lines.note(d, optionAt("key", len(p.Keys)))
			k, err := parseKey(d)
			if err != nil {
				return err
			}
			p.Keys = append(p.Keys, k)

		case "pin_cookie":
			if err := p.parsePinCookie(d, lines); err != nil {
				return err
			}

		case "secret":
			args := d.RemainingArgs()
			if len(args) == 0 {
				return d.Err("secret: need a value: secret <current> [<previous>...]")
			}
			p.Secret = args[0]
			if len(args) > 1 {
				p.PreviousSecrets = args[1:]
			}
			if d.NextBlock(d.Nesting()) {
				return d.Errf("secret takes no block, got %q", d.Val())
			}

		case "scope":
			s, err := oneArg(d)
			if err != nil {
				return err
			}
			p.Scope = s

		case "session_ttl", "hold", "slow_start":
			s, err := oneArg(d)
			if err != nil {
				return err
			}
			dur, err := caddy.ParseDuration(s)
			if err != nil {
				return d.Errf("%s: invalid duration %q: %v", opt, s, err)
			}
			if dur <= 0 {
				return d.Errf("%s: %q is not a positive duration", opt, s)
			}
			*map[string]*caddy.Duration{"session_ttl": &p.SessionTTL, "hold": &p.Hold, "slow_start": &p.SlowStart}[opt] = caddy.Duration(dur)

		case "max_sessions":
			s, err := oneArg(d)
			if err != nil {
				return err
			}
			n, err := strconv.Atoi(s)
			if err != nil || n <= 0 {
				return d.Errf("max_sessions: %q is not a positive whole number", s)
			}
			p.MaxSessions = n

		case "balance_factor":
			s, err := oneArg(d)
			if err != nil {
				return err
			}
			c, err := strconv.ParseFloat(s, 64)
			if err != nil {
				return d.Errf("balance_factor: %q is not a number (1.25 is a sensible value)", s)
			}
			p.BalanceFactor = c

		case "tomcat_route":
			args := d.RemainingArgs()
			if len(args) != 2 {
				return d.Errf("tomcat_route: need a route and an upstream address (tomcat_route node1 10.0.0.1:8080), got %d arguments", len(args))
			}
			route, dial := args[0], args[1]
			if _, dup := p.TomcatRoutes[route]; dup {
				return d.Errf("tomcat_route: route %q given twice", route)
			}
			lines.note(d, optionAt("tomcat_route", route))
			if p.TomcatRoutes == nil {
				p.TomcatRoutes = make(map[string]string)
			}
			p.TomcatRoutes[route] = dial

		case "store":
			c, err := sessions.ParseCaddyfile(d)
			if err != nil {
				return err
			}
			p.Store = c

		case "probe":
			p.Probe = new(healthcheck.Probe)
			if err := p.Probe.UnmarshalCaddyfile(d); err != nil {
				return err
			}

		case "weights":
			args := d.RemainingArgs()
			if len(args) == 0 {
				return d.Err("weights: need one weight per upstream, in the order the upstreams are listed")
			}
			for _, a := range args {
				w, err := strconv.Atoi(a)
				if err != nil {
					return d.Errf("weights: %q is not a whole number >= 0", a)
				}
				p.Weights = append(p.Weights, w)
			}

		default:
			return d.Errf("unrecognized affinity option %q (want key, pin_cookie, secret, session_ttl, max_sessions, weights, hold, slow_start, balance_factor, tomcat_route, scope, store or probe)", opt)
		}
	}
	return nil
}

// parseKey parses the arguments of one `key` line (keys.Parse).
func parseKey(d *caddyfile.Dispenser) (keys.Source, error) {
	k, err := keys.Parse(d.RemainingArgs())
	if err != nil {
		return k, d.Err(err.Error())
	}
	return k, nil
}

// parsePinCookie parses a pin_cookie line and its block, recording each
// attribute's line: Validate checks the values and their combinations.
func (p *Policy) parsePinCookie(d *caddyfile.Dispenser, lines optionLines) error {
	args := d.RemainingArgs()
	if len(args) > 1 {
		return d.Errf("pin_cookie: takes one value (a name or off), got %d", len(args))
	}
	var name string
	if len(args) == 1 {
		name = args[0]
	}
	if name == "off" {
		if d.NextBlock(d.Nesting()) {
			return d.Errf("pin_cookie off takes no block, got %q", d.Val())
		}
		p.DisablePinCookie = true
		return nil
	}
	p.PinCookie = name
	var a pin.Attributes
	seen := map[string]bool{}
	block := false
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		block = true
		opt := d.Val()
		if seen[opt] {
			return d.Errf("pin_cookie: %s specified more than once", opt)
		}
		seen[opt] = true
		lines.note(d, optionAt("pin_cookie", opt))
		if opt == "partitioned" {
			if d.NextArg() {
				return d.Errf("pin_cookie partitioned takes no value, got %q", d.Val())
			}
			a.Partitioned = true
			continue
		}
		v, err := oneArg(d)
		if err != nil {
			return err
		}
		switch opt {
		case "domain":
			a.Domain = v
		case "path":
			a.Path = v
		case "same_site":
			a.SameSite = v
		case "secure":
			a.Secure = v
		case "max_age":
			dur, err := caddy.ParseDuration(v)
			if err != nil {
				return d.Errf("pin_cookie max_age: invalid duration %q: %v", v, err)
			}
			if dur <= 0 {
				return d.Errf("pin_cookie max_age: %q is not a positive duration; leave max_age out for a browser-session cookie", v)
			}
			a.MaxAge = caddy.Duration(dur)
		default:
			return d.Errf("pin_cookie: unrecognized attribute %q (want domain, path, same_site, secure, max_age or partitioned)", opt)
		}
	}
	if !block {
		if name == "" {
			return d.Err("pin_cookie: need a value (a name or off), or a block of attributes")
		}
		return nil
	}
	p.PinCookieAttributes = &a
	return nil
}

// oneArg returns the single argument of the current line.
func oneArg(d *caddyfile.Dispenser) (string, error) {
	opt := d.Val()
	if !d.NextArg() {
		return "", d.Errf("%s: need a value", opt)
	}
	v := d.Val()
	if d.NextArg() {
		return "", d.Errf("%s: takes one value, got more (%q)", opt, d.Val())
	}
	return v, nil
}

// Interface guard
var _ caddyfile.Unmarshaler = (*Policy)(nil)
