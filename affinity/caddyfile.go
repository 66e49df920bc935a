package affinity

import (
	"math"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"

	"github.com/caddy-affinity/caddy-affinity/healthcheck"

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
	if d.NextArg() {
		return d.Errf("affinity takes no arguments on the lb_policy line, got %q; options go in a block", d.Val())
	}
	seen := make(map[string]bool)
	// Options that need a key line, which may come later in the block,
	// keep their error (naming their line) until the block is read.
	var needKey, needIDKey error
	// The cookie keys' names, with the error (naming the key's line) if
	// one turns out to be the pin cookie's, which may be named later.
	var pinKey map[string]error
	for d.NextBlock(0) {
		opt := d.Val()
		if opt != "key" && opt != "tomcat_route" && seen[opt] {
			return d.Errf("%s specified more than once", opt)
		}
		seen[opt] = true
		switch opt {
		case "key":
			if d.CountRemainingArgs() == 1 && d.Val() == "key" {
				if d.NextArg(); d.Val() == "none" {
					if len(p.Keys) > 0 || p.NoDefaultKeys {
						return d.Err("key none: no other key line may go with it")
					}
					p.NoDefaultKeys = true
					break
				}
				d.Prev()
			}
			if p.NoDefaultKeys {
				return d.Err("key: no key line may go with `key none`")
			}
			k, err := parseKey(d)
			if err != nil {
				return err
			}
			p.Keys = append(p.Keys, k)
			if k.From == "cookie" && pinKey == nil {
				pinKey = map[string]error{}
			}
			if k.From == "cookie" {
				pinKey[k.Name] = d.Errf("key cookie %s: that is the pin cookie's name; key on the app's session cookie, or rename the pin with pin_cookie <name>", k.Name)
			}

		case "pin_cookie":
			if err := p.parsePinCookie(d); err != nil {
				return err
			}

		case "secret":
			args := d.RemainingArgs()
			if len(args) == 0 {
				return d.Err("secret: need a value: secret <current> [<previous>...]")
			}
			for i, a := range args[1:] {
				if a == args[0] || slices.Contains(args[1:i+1], a) {
					return d.Errf("secret: %q is given twice", a)
				}
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

		case "session_ttl":
			s, err := oneArg(d)
			if err != nil {
				return err
			}
			dur, err := caddy.ParseDuration(s)
			if err != nil {
				return d.Errf("session_ttl: invalid duration %q: %v", s, err)
			}
			if dur < 1e9 {
				return d.Errf("session_ttl: %q is too short, the least is 1s", s)
			}
			if dur > maxSessionTTL {
				return d.Errf("session_ttl: %q is too long, the most is %s", s, maxSessionTTL)
			}
			p.SessionTTL = caddy.Duration(dur)

		case "max_sessions":
			s, err := oneArg(d)
			if err != nil {
				return err
			}
			n, err := strconv.Atoi(s)
			if err != nil || n <= 0 {
				return d.Errf("max_sessions: %q is not a positive whole number", s)
			}
			if n < minMaxSessions {
				return d.Errf("max_sessions: %d is too small, the least is %d (the session table has %d shards)", n, minMaxSessions, sessions.Shards)
			}
			p.MaxSessions = n

		case "hold", "slow_start":
			s, err := oneArg(d)
			if err != nil {
				return err
			}
			dur, err := caddy.ParseDuration(s)
			if err != nil || dur <= 0 {
				return d.Errf("%s: %q is not a positive duration", opt, s)
			}
			if most := map[string]time.Duration{"hold": maxHold, "slow_start": maxSlowStart}[opt]; dur > most {
				return d.Errf("%s: %q is too long, the most is %s", opt, s, most)
			}
			if opt == "hold" {
				p.Hold = caddy.Duration(dur)
			} else {
				p.SlowStart = caddy.Duration(dur)
			}

		case "balance_factor":
			s, err := oneArg(d)
			if err != nil {
				return err
			}
			c, err := strconv.ParseFloat(s, 64)
			if err != nil || !(c > 1) || math.IsInf(c, 0) {
				return d.Errf("balance_factor: %q is not a number more than 1 (1.25 is a sensible value)", s)
			}
			p.BalanceFactor = c
			needKey = d.Err("balance_factor needs a key line: live sessions are counted in the session table, by key")

		case "tomcat_route":
			args := d.RemainingArgs()
			if len(args) != 2 {
				return d.Errf("tomcat_route: need a route and an upstream address (tomcat_route node1 10.0.0.1:8080), got %d arguments", len(args))
			}
			route, dial := args[0], args[1]
			if strings.ContainsAny(route, " ;,=") {
				return d.Errf("tomcat_route: route %q has a space, ';', ',' or '='", route)
			}
			if _, dup := p.TomcatRoutes[route]; dup {
				return d.Errf("tomcat_route: route %q given twice", route)
			}
			if p.TomcatRoutes == nil {
				p.TomcatRoutes = make(map[string]string)
			}
			p.TomcatRoutes[route] = dial
			if needIDKey == nil {
				needIDKey = d.Err(errTomcatRouteKey)
			}

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
				if err != nil || w < 0 {
					return d.Errf("weights: %q is not a whole number >= 0", a)
				}
				p.Weights = append(p.Weights, w)
			}

		default:
			return d.Errf("unrecognized affinity option %q (want key, pin_cookie, secret, session_ttl, max_sessions, weights, hold, slow_start, balance_factor, tomcat_route, scope, store or probe)", opt)
		}
	}
	if needKey != nil && p.NoDefaultKeys {
		return needKey
	}
	pin := p.PinCookie
	if pin == "" {
		pin = DefaultPinCookie
	}
	if err := pinKey[pin]; err != nil && !p.DisablePinCookie {
		return err
	}
	if needIDKey != nil && !p.readsTomcatRoutes() {
		return needIDKey
	}
	return nil
}

// parseKey parses the arguments of one `key` line: the source, then what
// its kind takes (keyKinds).
func parseKey(d *caddyfile.Dispenser) (KeySource, error) {
	args := d.RemainingArgs()
	if len(args) == 0 {
		return KeySource{}, d.Errf("key: need a source: %s", kindList())
	}
	k := KeySource{From: args[0]}
	kk := kindNamed(k.From)
	if kk == nil {
		return k, d.Errf("key: %v", unknownSource(k.From))
	}
	k.kind = kk
	if err := k.setArgs(args[1:]); err != nil {
		return k, d.Err(err.Error())
	}
	probe := k
	if err := probe.provision(); err != nil {
		return k, d.Err(err.Error())
	}
	k.kind = nil // set again at provision time
	return k, nil
}

// parsePinCookie parses a pin_cookie line and its block. Each attribute
// is checked on its own line; the combinations (secure auto with
// same_site none or partitioned) once the block is read, naming the
// secure line.
func (p *Policy) parsePinCookie(d *caddyfile.Dispenser) error {
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
	if name != "" && !validCookieName(name) {
		return d.Errf("pin_cookie: %q is not a valid cookie name", name)
	}
	p.PinCookie = name
	var a PinCookieAttributes
	var secureAuto error // the secure auto line's error, if it turns out one
	seen := map[string]bool{}
	block := false
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		block = true
		opt := d.Val()
		if seen[opt] {
			return d.Errf("pin_cookie: %s specified more than once", opt)
		}
		seen[opt] = true
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
		var probe PinCookieAttributes // checks this line alone
		switch opt {
		case "domain":
			a.Domain, probe.Domain = v, v
		case "path":
			a.Path, probe.Path = v, v
		case "same_site":
			a.SameSite, probe.SameSite = v, v
		case "secure":
			a.Secure, probe.Secure = v, v
			secureAuto = d.Err(errSecureAuto)
		case "max_age":
			dur, err := caddy.ParseDuration(v)
			if err != nil {
				return d.Errf("pin_cookie max_age: invalid duration %q: %v", v, err)
			}
			if dur <= 0 {
				return d.Errf("pin_cookie max_age: %q is not a positive duration; leave max_age out for a browser-session cookie", v)
			}
			a.MaxAge, probe.MaxAge = caddy.Duration(dur), caddy.Duration(dur)
		default:
			return d.Errf("pin_cookie: unrecognized attribute %q (want domain, path, same_site, secure, max_age or partitioned)", opt)
		}
		if _, err := probe.style(); err != nil {
			return d.Err(err.Error())
		}
	}
	if !block {
		if name == "" {
			return d.Err("pin_cookie: need a value (a name or off), or a block of attributes")
		}
		return nil
	}
	if _, err := a.style(); err != nil {
		if err.Error() == errSecureAuto && secureAuto != nil {
			return secureAuto
		}
		return d.Err(err.Error())
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
