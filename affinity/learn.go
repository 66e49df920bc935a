package affinity

import (
	"io"
	"net/http"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/caddy-affinity/caddy-affinity/affinity/keys"
	"github.com/caddy-affinity/caddy-affinity/affinity/sessions"
)

func init() {
	caddy.RegisterModule(new(Learn))
	httpcaddyfile.RegisterHandlerDirective("affinity_learn", parseLearnCaddyfile)
	httpcaddyfile.RegisterDirectiveOrder("affinity_learn", httpcaddyfile.Before, "reverse_proxy")
}

// Learn is the `affinity_learn` HTTP handler, the companion of the
// affinity selection policy for apps whose session id is their own
// cookie. A selection policy sees requests, never responses; this
// handler sees the response of the upstream the policy chose, and when
// that response issues a session id the policy keys on (a Set-Cookie of
// a `key cookie` name, or a Location carrying a `key path_param` or
// `key aspnet_cookieless` id), it records id -> upstream in the session
// table at once. The session's next request, which carries the new id,
// then goes to the worker that created the session, with or without the
// pin cookie, and with any number of clients behind one address.
//
// When the app replaces a session id (ASP.NET Core, express-session's
// regenerate, Tomcat's changeSessionId at login), the new id is
// recorded and the old one is retired: it stays usable for a short grace
// (for requests already on their way) and then expires. When the app
// deletes its session cookie, the old id is forgotten.
//
// It must run before reverse_proxy in the same route, which the
// Caddyfile directive order does by default. It does nothing for
// requests that no affinity policy proxied.
type Learn struct{}

// CaddyModule returns the Caddy module information.
func (Learn) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.affinity_learn",
		New: func() caddy.Module { return new(Learn) },
	}
}

// learnVar names the request var where the learner leaves its response
// writer, for Select to tell it which policy and upstream served the
// request. Select only reads the var: a request without the learner
// costs it one map lookup.
const learnVar = "affinity.learn"

// ServeHTTP wraps the response writer and passes the request on.
func (Learn) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	lw := &learnWriter{ResponseWriterWrapper: &caddyhttp.ResponseWriterWrapper{ResponseWriter: w}, r: r}
	// The var stays after next returns: the request's vars must not be
	// written then (a dial Caddy's transport started for the request may
	// still read them).
	caddyhttp.SetVar(r.Context(), learnVar, lw)
	return next.ServeHTTP(lw, r)
}

// learnWriter is the response writer of one request through the
// learner. Select fills in policy and up; the first final WriteHeader
// learns from the response headers.
type learnWriter struct {
	*caddyhttp.ResponseWriterWrapper
	r       *http.Request
	policy  *Policy
	up      uint32 // the chosen upstream's healthcheck ID
	learned bool   // the final header was seen
	// budget is what the request may still wait for a shared session
	// store, as Select left it.
	budget sessions.Budget
}

// chose records that p sent the request to the upstream with ID id, and
// the request's budget for the session store; the last call (the attempt
// that answered) wins.
func (lw *learnWriter) chose(p *Policy, id uint32, budget sessions.Budget) {
	lw.policy, lw.up, lw.budget = p, id, budget
}

// WriteHeader learns from the final response's headers, then writes
// them. Informational (1xx) responses other than 101 are not final.
func (lw *learnWriter) WriteHeader(status int) {
	if !lw.learned && (status >= 200 || status == http.StatusSwitchingProtocols) {
		lw.learned = true
		if lw.policy != nil {
			lw.policy.learn(lw.Header(), lw.r, lw.up, &lw.budget)
		}
	}
	lw.ResponseWriterWrapper.WriteHeader(status)
}

// Write writes the header first if nobody did, as net/http would.
func (lw *learnWriter) Write(b []byte) (int, error) {
	if !lw.learned {
		lw.WriteHeader(http.StatusOK)
	}
	return lw.ResponseWriterWrapper.Write(b)
}

// ReadFrom writes the header first if nobody did: the wrapper's
// ReadFrom goes straight to the underlying writer.
func (lw *learnWriter) ReadFrom(src io.Reader) (int64, error) {
	if !lw.learned {
		lw.WriteHeader(http.StatusOK)
	}
	return lw.ResponseWriterWrapper.ReadFrom(src)
}

// FlushError writes the header first if nobody did, then flushes
// (http.ResponseController prefers it to Unwrap).
func (lw *learnWriter) FlushError() error {
	if !lw.learned {
		lw.WriteHeader(http.StatusOK)
	}
	return http.NewResponseController(lw.ResponseWriterWrapper.ResponseWriter).Flush()
}

// learn records the session ids a response of upstream id issues: the
// keys whose kind learns from Set-Cookie or Location (keys.Source).
func (p *Policy) learn(h http.Header, r *http.Request, id uint32, budget *sessions.Budget) {
	if p.sessions == nil {
		return
	}
	now := sessions.Now()
	issued, issuedBy := "", (*keys.Source)(nil)
	for _, line := range h["Set-Cookie"] {
		c, ok := keys.ParseSetCookie(line)
		if !ok {
			continue
		}
		for i := range p.Keys {
			k := &p.Keys[i]
			if k.LearnsCookie(c.Name) {
				p.learnID(k, r, c.Value, c.Deleted, id, now, budget)
				if !c.Deleted && issued == "" {
					issued, issuedBy = c.Value, k
				}
				break
			}
		}
	}
	if issued != "" {
		// The session's next request comes with this id: its pin, if
		// this response issues one, is bound to it already.
		p.bindIssuedPin(h, id, issuedBy.HashValue(issued))
	}
	if locs := h["Location"]; len(locs) > 0 {
		path := keys.LocationPath(locs[0])
		for i := range p.Keys {
			k := &p.Keys[i]
			if v, ok := k.LearnLocation(path); ok {
				p.learnID(k, r, v, false, id, now, budget)
			}
		}
	}
}

// learnID records a session id that upstream id issued for key k, and
// retires (or, when the app deleted it, forgets) the id the request came
// with if it is another one.
func (p *Policy) learnID(k *keys.Source, r *http.Request, value string, deleted bool, id, now uint32, budget *sessions.Budget) {
	old, hadOld := k.Value(r)
	if deleted {
		if hadOld {
			p.sessions.Forget(k.HashValue(old), now, budget)
		}
		return
	}
	p.sessions.Learn(k.HashValue(value), id, now, budget)
	if hadOld && old != value {
		p.sessions.Retire(k.HashValue(old), now, budget)
	}
}

// bindIssuedPin binds the pin a response issues for upstream up to the
// session key the app issued in that same response (pin.Signer.BindIssued).
func (p *Policy) bindIssuedPin(h http.Header, up uint32, key uint64) {
	ps := p.pools.Load()
	if p.DisablePinCookie || ps == nil || ps.pins == nil {
		return
	}
	if i := ps.indexByID(up); i >= 0 {
		ps.pins.BindIssued(h, i, key)
	}
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens. Syntax:
//
//	affinity_learn
//
// It takes no arguments. Put it in the site block (it is ordered before
// reverse_proxy) or in a route before reverse_proxy:
//
//	route {
//		affinity_learn
//		reverse_proxy ...
//	}
func (l *Learn) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // the directive name
	if d.NextArg() {
		return d.Errf("affinity_learn takes no arguments, got %q", d.Val())
	}
	if d.NextBlock(0) {
		return d.Errf("affinity_learn takes no options, got %q", d.Val())
	}
	return nil
}

// parseLearnCaddyfile unmarshals the affinity_learn directive.
func parseLearnCaddyfile(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	l := new(Learn)
	err := l.UnmarshalCaddyfile(h.Dispenser)
	return l, err
}

// Interface guards
var (
	_ caddyhttp.MiddlewareHandler = (*Learn)(nil)
	_ caddyfile.Unmarshaler       = (*Learn)(nil)
	_ http.ResponseWriter         = (*learnWriter)(nil)
	_ io.ReaderFrom               = (*learnWriter)(nil)
)
