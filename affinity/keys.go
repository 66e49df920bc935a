package affinity

import (
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"strings"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/caddy-affinity/caddy-affinity/hashring"
)

// KeySource is one place a session key may come from. Sources are tried in
// the order they are configured; the first one present in a request is
// the session key.
type KeySource struct {
	// From is where the key is read: "cookie", "header", "query",
	// "client_ip", "path_param" (a path parameter such as Java's
	// `;jsessionid=<id>`) or "aspnet_cookieless" (the session id of an
	// ASP.NET cookieless URL, `/(S(<id>))/...`).
	//
	// A session id read from the path hashes like the same value read
	// from a cookie: `;jsessionid=X` and the cookie `JSESSIONID=X` are
	// one key, so a session that starts with URL rewriting and goes on
	// with the cookie keeps its entry.
	From string `json:"from"`

	// Name is the cookie, header, query parameter or path parameter name.
	// Not used with client_ip and aspnet_cookieless.
	Name string `json:"name,omitempty"`

	// IPv4Bits and IPv6Bits are prefix lengths applied to the client IP
	// before hashing, so that for example every address of one /64 is one
	// key. Defaults 32 and 64 (IPv6 clients rotate privacy addresses
	// within their /64). Only with client_ip.
	IPv4Bits int `json:"ipv4_bits,omitempty"`
	IPv6Bits int `json:"ipv6_bits,omitempty"`

	kind keyKind
}

type keyKind uint8

const (
	keyCookie keyKind = iota + 1
	keyHeader
	keyQuery
	keyClientIP
	keyPathParam
	keyCookieless
)

// provision checks the source and fills in its defaults.
func (k *KeySource) provision() error {
	switch k.From {
	case "cookie":
		k.kind = keyCookie
	case "header":
		k.kind = keyHeader
		k.Name = http.CanonicalHeaderKey(k.Name)
	case "query":
		k.kind = keyQuery
	case "path_param":
		k.kind = keyPathParam
		if strings.ContainsAny(k.Name, "/?#") {
			return fmt.Errorf("key path_param: name %q has a '/', '?' or '#'", k.Name)
		}
	case "aspnet_cookieless":
		k.kind = keyCookieless
		if k.Name != "" {
			return fmt.Errorf("key aspnet_cookieless takes no name")
		}
		return nil
	case "client_ip":
		k.kind = keyClientIP
		if k.Name != "" {
			return fmt.Errorf("key client_ip takes no name")
		}
		if k.IPv4Bits == 0 {
			k.IPv4Bits = 32
		}
		if k.IPv6Bits == 0 {
			k.IPv6Bits = 64
		}
		if k.IPv4Bits < 0 || k.IPv4Bits > 32 {
			return fmt.Errorf("key client_ip: IPv4 prefix length %d is not in 1..32", k.IPv4Bits)
		}
		if k.IPv6Bits < 0 || k.IPv6Bits > 128 {
			return fmt.Errorf("key client_ip: IPv6 prefix length %d is not in 1..128", k.IPv6Bits)
		}
		return nil
	default:
		return fmt.Errorf("unknown key source %q: want cookie, header, query, client_ip, path_param or aspnet_cookieless", k.From)
	}
	if k.Name == "" {
		return fmt.Errorf("key %s needs a name", k.From)
	}
	if strings.ContainsAny(k.Name, " \t\r\n;=") && k.kind != keyHeader {
		return fmt.Errorf("key %s: name %q has a space, ';' or '='", k.From, k.Name)
	}
	return nil
}

// hash returns the key's hash and whether the request carries the key.
// Each kind hashes with its own seed so that equal strings from different
// sources are different keys. It does not allocate.
func (k *KeySource) hash(r *http.Request) (uint64, bool) {
	switch k.kind {
	case keyCookie, keyPathParam, keyCookieless:
		if v, ok := k.sessionID(r); ok {
			return sessionIDHash(v), true
		}
	case keyHeader:
		if vs := r.Header[k.Name]; len(vs) > 0 && vs[0] != "" {
			return hashring.HashStringSeed(vs[0], uint64(keyHeader)), true
		}
	case keyQuery:
		if v, ok := queryValue(r.URL.RawQuery, k.Name); ok {
			return hashring.HashStringSeed(v, uint64(keyQuery)), true
		}
	case keyClientIP:
		if ip, ok := clientIP(r); ok {
			bits := k.IPv6Bits
			if ip.Is4() {
				bits = k.IPv4Bits
			}
			if p, err := ip.Prefix(bits); err == nil {
				b := p.Addr().As16()
				return hashring.HashSeed(b[:], uint64(keyClientIP)), true
			}
		}
	}
	return 0, false
}

// sessionID returns the value of a cookie, path_param or
// aspnet_cookieless key in the request. It does not allocate.
func (k *KeySource) sessionID(r *http.Request) (string, bool) {
	switch k.kind {
	case keyCookie:
		return cookieValue(r.Header, k.Name)
	case keyPathParam:
		return pathParam(rawPath(r), k.Name)
	case keyCookieless:
		return aspnetCookielessID(rawPath(r))
	}
	return "", false
}

// sessionIDHash is the key hash of an app's session id, wherever it was
// read (cookie, path parameter, cookieless URL) or learned (Set-Cookie,
// Location).
func sessionIDHash(v string) uint64 {
	return hashring.HashStringSeed(v, uint64(keyCookie))
}

// cookieValue returns the value of the first cookie called name in the
// request's Cookie headers. Unlike r.Cookie it allocates nothing and does
// not give up on a header that has one malformed cookie among good ones.
// Surrounding double quotes are removed; an empty value counts as absent.
func cookieValue(h http.Header, name string) (string, bool) {
	for _, line := range h["Cookie"] {
		for line != "" {
			var part string
			part, line, _ = strings.Cut(line, ";")
			for part != "" && (part[0] == ' ' || part[0] == '\t') {
				part = part[1:]
			}
			if len(part) <= len(name) || part[len(name)] != '=' || part[:len(name)] != name {
				continue
			}
			v := part[len(name)+1:]
			for v != "" && (v[len(v)-1] == ' ' || v[len(v)-1] == '\t') {
				v = v[:len(v)-1]
			}
			if len(v) >= 2 && v[0] == '"' && v[len(v)-1] == '"' {
				v = v[1 : len(v)-1]
			}
			if v != "" {
				return v, true
			}
		}
	}
	return "", false
}

// queryValue returns the raw (still percent-encoded) value of the first
// query parameter called name. The raw form is hashed as it is: a client
// sends its session id the same way every time.
func queryValue(rawQuery, name string) (string, bool) {
	for rawQuery != "" {
		var part string
		part, rawQuery, _ = strings.Cut(rawQuery, "&")
		if len(part) > len(name) && part[len(name)] == '=' && part[:len(name)] == name {
			if v := part[len(name)+1:]; v != "" {
				return v, true
			}
		}
	}
	return "", false
}

// clientIP returns the client's address as Caddy determined it: the
// client_ip var honours trusted_proxies, so a spoofed X-Forwarded-For from
// an untrusted peer changes nothing. IPv4-mapped IPv6 addresses are
// unmapped so that one client is one key on a dual-stack listener.
func clientIP(r *http.Request) (netip.Addr, bool) {
	s, _ := caddyhttp.GetVar(r.Context(), caddyhttp.ClientIPVarKey).(string)
	if s == "" {
		// Outside Caddy's server (tests, benchmarks): the peer address.
		host, _, err := net.SplitHostPort(r.RemoteAddr)
		if err != nil {
			return netip.Addr{}, false
		}
		s = host
	}
	ip, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Addr{}, false
	}
	return ip.Unmap().WithZone(""), true
}
