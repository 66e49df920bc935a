// Package keys reads a request's session keys: the sources a policy's
// `key` lines name (cookie, header, query, client_ip, path_param,
// aspnet_cookieless, the platforms' session cookies), one descriptor per
// kind in kinds, and how each is hashed, learned from a response and
// injected into a lookup's request. It is beneath the policy: it knows
// nothing of pins, the table or placement, so that adding a key source
// is one entry in kinds and a test.
package keys

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"net/textproto"
	"strconv"
	"strings"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/caddy-affinity/caddy-affinity/hashring"
)

// Source is one place a session key may come from (a `key` line). Sources are tried in
// the order they are configured; the first one present in a request is
// the session key.
type Source struct {
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

	kind *kind
}

// kind describes one kind of key source: everything the Caddyfile
// parser, provisioning, Select, the learner and the lookup know of it.
// Adding a kind of key is adding one entry to kinds.
type kind struct {
	// name is the source's name in the Caddyfile and in JSON (From).
	name string
	// named: the source needs a Name (a cookie, header... name).
	named bool
	// foldsCase: the Name matches requests whatever its case (header
	// names), so the lookup finds the key by any case of it.
	foldsCase bool
	// seed is the hash seed of the kind's values, so that equal strings
	// from different sources are different keys. Every session-id kind
	// shares seedSessionID, so that one id is one key wherever it is read.
	seed uint64
	// tomcatRoute: the value is a Java session id, from which a
	// tomcat_route suffix is read.
	tomcatRoute bool
	// shared: many users may send one value (an address behind NAT), so
	// the key tells no app session apart.
	shared bool
	// read returns the key's value in the request without allocating
	// (nil for kinds that hash something else than a string).
	read func(k *Source, r *http.Request) (string, bool)
	// hash replaces hashing read's value (client_ip hashes an address).
	hash func(k *Source, r *http.Request) (uint64, bool)
	// readsCookie reports whether the key reads a request cookie of that
	// name (nil: it reads none). The pin cookie may not be one of them.
	readsCookie func(k *Source, name string) bool
	// learnCookie reports whether a Set-Cookie of that name issues this
	// key (affinity_learn); nil: cookies never do.
	learnCookie func(k *Source, name string) bool
	// learnLocation reads the key from the path of a Location header
	// (affinity_learn); nil: redirects never carry it.
	learnLocation func(k *Source, path string) (string, bool)
	// inject puts value where read finds it, in a request that carries
	// nothing else: the lookup endpoint's request.
	inject func(k *Source, r *http.Request, value string) error
	// args takes the Caddyfile arguments after the source (nil: the one
	// name of a named kind, or nothing).
	args func(k *Source, args []string) error
	// provision checks the source and fills in its defaults (nil: the
	// name checks every named kind gets).
	provision func(k *Source) error
	// describe names the source as the Caddyfile writes it (nil: "from
	// name").
	describe func(k *Source) string
}

// Hash seeds: kept from the first release, so that a key's hash (and so
// its ring owner) never changes between versions.
const (
	seedSessionID = 1
	seedHeader    = 2
	seedQuery     = 3
	seedClientIP  = 4
	// SeedConnection hashes a connection's address for the placement of
	// a request that carries no key (5 is the scope's, in package affinity).
	SeedConnection = 6
)

// kinds is every kind of key source, in the order error messages list
// them.
var kinds = []*kind{
	{
		name: "cookie", named: true, seed: seedSessionID, tomcatRoute: true,
		read:        func(k *Source, r *http.Request) (string, bool) { return CookieValue(r.Header, k.Name) },
		readsCookie: func(k *Source, name string) bool { return name == k.Name },
		learnCookie: func(k *Source, name string) bool { return name == k.Name },
		inject: func(k *Source, r *http.Request, v string) error {
			if strings.ContainsAny(v, ";\r\n") {
				return errors.New("a cookie value cannot contain ';' or a line break")
			}
			r.Header.Set("Cookie", k.Name+"="+v)
			return nil
		},
	},
	{
		name: "header", named: true, foldsCase: true, seed: seedHeader,
		read: func(k *Source, r *http.Request) (string, bool) {
			if vs := r.Header[k.Name]; len(vs) > 0 && vs[0] != "" {
				return vs[0], true
			}
			return "", false
		},
		inject: func(k *Source, r *http.Request, v string) error { r.Header.Set(k.Name, v); return nil },
		provision: func(k *Source) error {
			if k.Name == "" {
				return fmt.Errorf("key %s needs a name", k.From)
			}
			k.Name = http.CanonicalHeaderKey(k.Name)
			return nil
		},
	},
	{
		name: "query", named: true, seed: seedQuery,
		read:   func(k *Source, r *http.Request) (string, bool) { return queryValue(r.URL.RawQuery, k.Name) },
		inject: func(k *Source, r *http.Request, v string) error { r.URL.RawQuery = k.Name + "=" + v; return nil },
	},
	{
		name: "client_ip", seed: seedClientIP, shared: true,
		hash: hashClientIP,
		inject: func(k *Source, r *http.Request, v string) error {
			ip, err := netip.ParseAddr(v)
			if err != nil {
				return fmt.Errorf("%q is not an IP address", v)
			}
			r.RemoteAddr = net.JoinHostPort(ip.String(), "0")
			return nil
		},
		args:      clientIPArgs,
		provision: provisionClientIP,
		describe: func(k *Source) string {
			return fmt.Sprintf("client_ip /%d /%d", k.IPv4Bits, k.IPv6Bits)
		},
	},
	{
		name: "path_param", named: true, seed: seedSessionID, tomcatRoute: true,
		read: func(k *Source, r *http.Request) (string, bool) { return pathParam(rawPath(r), k.Name) },
		// Servlet containers name the cookie JSESSIONID and the path
		// parameter jsessionid.
		learnCookie:   func(k *Source, name string) bool { return strings.EqualFold(name, k.Name) },
		learnLocation: func(k *Source, path string) (string, bool) { return pathParam(path, k.Name) },
		inject: func(k *Source, r *http.Request, v string) error {
			if strings.ContainsAny(v, ";/?#") {
				return errors.New("a path parameter value cannot contain ';', '/', '?' or '#'")
			}
			r.URL.Path = "/;" + k.Name + "=" + v
			return nil
		},
		provision: func(k *Source) error {
			if strings.ContainsAny(k.Name, "/?#") {
				return fmt.Errorf("key path_param: name %q has a '/', '?' or '#'", k.Name)
			}
			return checkName(k)
		},
	},
	{
		name: "aspnet_cookieless", seed: seedSessionID,
		read:          func(_ *Source, r *http.Request) (string, bool) { return aspnetCookielessID(rawPath(r)) },
		learnLocation: func(_ *Source, path string) (string, bool) { return aspnetCookielessID(path) },
		inject: func(_ *Source, r *http.Request, v string) error {
			if strings.ContainsAny(v, "()/?#") {
				return errors.New("a cookieless session id cannot contain '(', ')', '/', '?' or '#'")
			}
			r.URL.Path = "/(S(" + v + "))/"
			return nil
		},
	},
	{
		// The session cookies of the common in-process-session platforms,
		// read in one pass over the Cookie header: the keys a policy has
		// when it is given none (see platformCookie).
		name: platformCookiesKind, seed: seedSessionID,
		read:        func(_ *Source, r *http.Request) (string, bool) { return platformCookieValue(r.Header) },
		readsCookie: func(_ *Source, name string) bool { return platformCookie(name) },
		learnCookie: func(_ *Source, name string) bool { return platformCookie(name) },
		inject: func(_ *Source, r *http.Request, v string) error {
			if strings.ContainsAny(v, ";\r\n") {
				return errors.New("a cookie value cannot contain ';' or a line break")
			}
			r.Header.Set("Cookie", "JSESSIONID="+v)
			return nil
		},
	},
}

// KindInfo is a kind of key source as the admin API and the status page
// offer it to a lookup.
type KindInfo struct {
	// Name is the source's name (Source.From).
	Name string `json:"name"`
	// Named: a key of the kind has a name (a cookie, header... name).
	Named bool `json:"named"`
}

// Kinds lists every kind of key source, from kinds.
func Kinds() []KindInfo {
	out := make([]KindInfo, len(kinds))
	for i, kk := range kinds {
		out[i] = KindInfo{Name: kk.name, Named: kk.named}
	}
	return out
}

// kindNamed returns the kind called name, or nil.
func kindNamed(name string) *kind {
	for _, kk := range kinds {
		if kk.name == name {
			return kk
		}
	}
	return nil
}

// kindList lists the kinds for error messages: "a, b or c".
func kindList() string {
	names := make([]string, len(kinds))
	for i, kk := range kinds {
		names[i] = kk.name
	}
	return strings.Join(names[:len(names)-1], ", ") + " or " + names[len(names)-1]
}

// unknownSource is the error for a source that is not a kind.
func unknownSource(from string) error {
	return fmt.Errorf("unknown source %q: want %s", from, kindList())
}

// desc returns the source's kind: the one Provision found, or, for a
// source not provisioned (a config being checked), the one its From
// names; nil for an unknown kind.
func (k *Source) desc() *kind {
	if k.kind != nil {
		return k.kind
	}
	return kindNamed(k.From)
}

// Learnable reports whether affinity_learn records the key when the app
// issues it (in a Set-Cookie or a Location).
func (k *Source) Learnable() bool {
	kk := k.desc()
	return kk != nil && (kk.learnCookie != nil || kk.learnLocation != nil)
}

// CarriesRoute reports whether the key's value is a Java session id,
// from which tomcat_route reads the worker's route.
func (k *Source) CarriesRoute() bool {
	kk := k.desc()
	return kk != nil && kk.tomcatRoute
}

// Shared reports whether many users may send one value of the key (an
// address behind NAT), so that it tells no app session apart.
func (k *Source) Shared() bool {
	kk := k.desc()
	return kk != nil && kk.shared
}

// Default reports whether the source is the keys a policy has when it
// is given none (the platforms' session cookies).
func (k *Source) Default() bool { return k.From == platformCookiesKind }

// Defaults are the keys of a policy given no `key` line and no `key
// none`: the session cookies of the common in-process-session platforms.
func Defaults() []Source { return []Source{{From: platformCookiesKind}} }

// ReadsCookie reports whether the key reads the request cookie called
// name (the pin cookie may not be one of them).
func (k *Source) ReadsCookie(name string) bool {
	kk := k.desc()
	return kk != nil && kk.readsCookie != nil && kk.readsCookie(k, name)
}

// LearnsCookie reports whether a Set-Cookie of that name issues the key
// (affinity_learn).
func (k *Source) LearnsCookie(name string) bool {
	kk := k.desc()
	return kk != nil && kk.learnCookie != nil && kk.learnCookie(k, name)
}

// LearnLocation reads the key from the path of a Location header
// (affinity_learn); false for kinds that redirects never carry.
func (k *Source) LearnLocation(path string) (string, bool) {
	kk := k.desc()
	if kk == nil || kk.learnLocation == nil {
		return "", false
	}
	return kk.learnLocation(k, path)
}

// Inject puts value where the key reads it, in a request that carries
// nothing else: the lookup endpoint's request.
func (k *Source) Inject(r *http.Request, value string) error {
	kk := k.desc()
	if kk == nil {
		return unknownSource(k.From)
	}
	return kk.inject(k, r, value)
}

// SameName compares a key name with the source's the way requests match
// them: whatever the case for kinds that fold it (header names).
func (k *Source) SameName(name string) bool {
	if kk := k.desc(); kk != nil && kk.foldsCase {
		return strings.EqualFold(k.Name, name)
	}
	return k.Name == name
}

// Parse reads one `key` line's arguments: the source, then what its kind
// takes. Its errors start with "key".
func Parse(args []string) (Source, error) {
	if len(args) == 0 {
		return Source{}, fmt.Errorf("key: need a source: %s", kindList())
	}
	k := Source{From: args[0]}
	kk := kindNamed(k.From)
	if kk == nil {
		return k, fmt.Errorf("key: %v", unknownSource(k.From))
	}
	k.kind = kk
	err := k.setArgs(args[1:])
	k.kind = nil // set by Provision
	return k, err
}

// setArgs takes the Caddyfile arguments after the source's name.
func (k *Source) setArgs(args []string) error {
	if k.kind.args != nil {
		return k.kind.args(k, args)
	}
	if !k.kind.named {
		if len(args) != 0 {
			return fmt.Errorf("key %s takes no arguments, got %d", k.From, len(args))
		}
		return nil
	}
	if len(args) != 1 {
		return fmt.Errorf("key %s: need exactly one name, got %d arguments", k.From, len(args))
	}
	k.Name = args[0]
	return nil
}

// Provision checks the source and fills in its defaults.
func (k *Source) Provision() error {
	k.kind = kindNamed(k.From)
	if k.kind == nil {
		return unknownSource(k.From)
	}
	if !k.kind.named && k.Name != "" {
		return fmt.Errorf("key %s takes no name", k.From)
	}
	if k.kind.provision != nil {
		return k.kind.provision(k)
	}
	if k.kind.named {
		return checkName(k)
	}
	return nil
}

// checkName checks the name of a cookie, query or path parameter key.
func checkName(k *Source) error {
	if k.Name == "" {
		return fmt.Errorf("key %s needs a name", k.From)
	}
	if strings.ContainsAny(k.Name, " \t\r\n;=") {
		return fmt.Errorf("key %s: name %q has a space, ';' or '='", k.From, k.Name)
	}
	return nil
}

// String names the source as the Caddyfile writes it, e.g. "cookie sid".
func (k *Source) String() string {
	switch {
	case k.kind != nil && k.kind.describe != nil:
		return k.kind.describe(k)
	case k.Name == "":
		return k.From
	}
	return k.From + " " + k.Name
}

// Hash returns the key's hash and whether the request carries the key.
// It does not allocate.
func (k *Source) Hash(r *http.Request) (uint64, bool) {
	if k.kind.hash != nil {
		return k.kind.hash(k, r)
	}
	if v, ok := k.kind.read(k, r); ok {
		return k.HashValue(v), true
	}
	return 0, false
}

// HashValue is the key hash of a value of the key, read from a request
// or learned from a response (affinity_learn): the kind's seed.
func (k *Source) HashValue(v string) uint64 { return hashring.HashStringSeed(v, k.kind.seed) }

// Value returns the key's value in the request (not for kinds that hash
// something else). It does not allocate.
func (k *Source) Value(r *http.Request) (string, bool) {
	if k.kind.read == nil {
		return "", false
	}
	return k.kind.read(k, r)
}

func clientIPArgs(k *Source, args []string) error {
	if len(args) > 2 {
		return fmt.Errorf("key client_ip: at most two prefix lengths (IPv4, IPv6), got %d", len(args))
	}
	bits := []*int{&k.IPv4Bits, &k.IPv6Bits}
	limits := []int{32, 128}
	for i, a := range args {
		n, err := strconv.Atoi(a)
		if err != nil || n < 1 || n > limits[i] {
			return fmt.Errorf("key client_ip: prefix length %q is not in 1..%d", a, limits[i])
		}
		*bits[i] = n
	}
	return nil
}

func provisionClientIP(k *Source) error {
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
}

// hashClientIP hashes the client's address, cut to the key's prefix.
func hashClientIP(k *Source, r *http.Request) (uint64, bool) {
	ip, ok := clientIP(r)
	if !ok {
		return 0, false
	}
	bits := k.IPv6Bits
	if ip.Is4() {
		bits = k.IPv4Bits
	}
	p, err := ip.Prefix(bits)
	if err != nil {
		return 0, false
	}
	b := p.Addr().As16()
	return hashring.HashSeed(b[:], k.kind.seed), true
}

// CookieValue returns the value of the cookie called name in the
// request's Cookie headers as net/http's r.Cookie reads it (which is what
// Go apps, scs among them, see): the first cookie of that name with a
// valid value, its double quotes removed; an empty value counts as
// absent, and so `sid=; sid=b` carries no sid, as for the app. Unlike
// r.Cookie it allocates nothing.
func CookieValue(h http.Header, name string) (string, bool) {
	for _, line := range h["Cookie"] {
		for line != "" {
			var part string
			if i := strings.IndexByte(line, ';'); i >= 0 {
				part, line = line[:i], line[i+1:]
			} else {
				part, line = line, ""
			}
			// The name first, so that the other cookies cost a compare:
			// net/http trims the part, then the name around its '='.
			for part != "" && cookieSpace(part[0]) {
				part = part[1:]
			}
			if len(part) < len(name) || part[:len(name)] != name {
				continue
			}
			rest := part[len(name):]
			for rest != "" && cookieSpace(rest[0]) {
				rest = rest[1:]
			}
			if rest == "" {
				return "", false // the name alone: an empty cookie
			}
			if rest[0] != '=' {
				continue // a longer name
			}
			v := rest[1:]
			for v != "" && cookieSpace(v[len(v)-1]) {
				v = v[:len(v)-1]
			}
			if len(v) > 1 && v[0] == '"' && v[len(v)-1] == '"' {
				v = v[1 : len(v)-1]
			}
			if !validCookieValue(v) {
				continue // net/http skips it and reads on
			}
			return v, v != ""
		}
	}
	return "", false
}

// cookieSpace is net/textproto's ASCII space, which net/http trims.
func cookieSpace(b byte) bool { return b == ' ' || b == '\t' || b == '\n' || b == '\r' }

// validCookieValue applies net/http's rule for the bytes of a cookie
// value: 0x20 to 0x7e but '"', ';' and '\\'. It checks eight bytes a
// step (a session id and a pin are 24 to 48 bytes, read on every request).
func validCookieValue(v string) bool {
	for len(v) >= 8 {
		if !validCookieWord(binary.LittleEndian.Uint64([]byte(v[:8]))) {
			return false
		}
		v = v[8:]
	}
	for i := 0; i < len(v); i++ {
		if !cookieValueBytes[v[i]] {
			return false
		}
	}
	return true
}

// validCookieWord reports whether the eight bytes of w are all allowed in
// a cookie value: no byte below 0x20 or from 0x7f, none of '"', ';', '\\'.
func validCookieWord(w uint64) bool {
	const ones, highs = 0x0101010101010101, 0x8080808080808080
	zeroIn := func(x uint64) bool { return (x-ones)&^x&highs != 0 }
	if w&highs != 0 || // 0x80 and above
		(w-0x2020202020202020)&^w&highs != 0 || // below 0x20
		zeroIn(w^0x7f7f7f7f7f7f7f7f) || zeroIn(w^0x2222222222222222) ||
		zeroIn(w^0x3b3b3b3b3b3b3b3b) || zeroIn(w^0x5c5c5c5c5c5c5c5c) {
		return false
	}
	return true
}

// cookieValueBytes are the bytes net/http allows in a cookie value, for
// the tail shorter than a word.
var cookieValueBytes = func() (ok [256]bool) {
	for b := 0x20; b < 0x7f; b++ {
		ok[b] = b != '"' && b != ';' && b != '\\'
	}
	return ok
}()

// platformCookies are the session cookie names of the platforms that keep
// sessions in process memory (or in per-host files), which a policy
// with no `key` lines keys on. Classic ASP names its cookie
// ASPSESSIONID<8 letters>, so that one is a prefix.
var platformCookies = []string{
	"ASP.NET_SessionId",   // ASP.NET (System.Web), Mono
	".AspNetCore.Session", // ASP.NET Core session middleware
	"JSESSIONID",          // Java servlet containers: Tomcat, Jetty, WildFly, ColdFusion
	"PHPSESSID",           // PHP
	"connect.sid",         // Node.js express-session
	"laravel_session",     // Laravel (file driver by default)
	"ci_session",          // CodeIgniter (file driver by default)
	"CGISESSID",           // Perl CGI::Session
	"sessionid",           // Django
}

// platformCookiesKind names the kind of the default keys.
const platformCookiesKind = "platform_cookies"

// platformCookiePrefix is classic ASP's cookie name prefix.
const platformCookiePrefix = "ASPSESSIONID"

// platformCookie reports whether name is a platform's session cookie.
func platformCookie(name string) bool {
	if len(name) > len(platformCookiePrefix) && name[:len(platformCookiePrefix)] == platformCookiePrefix {
		return true
	}
	for _, n := range platformCookies {
		if n == name {
			return true
		}
	}
	return false
}

// platformCookieValue returns the value of the first platform session
// cookie in the request, read as CookieValue reads one cookie, in one
// pass over the Cookie headers. It does not allocate.
func platformCookieValue(h http.Header) (string, bool) {
	for _, line := range h["Cookie"] {
		for line != "" {
			var part string
			part, line, _ = strings.Cut(line, ";")
			n, v, _ := strings.Cut(textproto.TrimString(part), "=")
			if !platformCookie(textproto.TrimString(n)) {
				continue
			}
			if len(v) > 1 && v[0] == '"' && v[len(v)-1] == '"' {
				v = v[1 : len(v)-1]
			}
			if validCookieValue(v) && v != "" {
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

// Max bounds the number of key sources, so that a request's key hashes
// fit in an array on the stack.
const Max = 8

// Read returns the hashes of the keys of sources present in request r,
// in the sources' order and each once, in buf's storage, and the source
// of the first (nil if none). skipShared leaves out the sources many
// users may share a value of (client_ip). It does not allocate.
//
// One id under two keys (Tomcat's `JSESSIONID=X` and `;jsessionid=X` on
// one request) is one key: recorded twice, its second record would turn
// the session's entry into an alias, which counts as no session.
func Read(r *http.Request, sources []Source, skipShared bool, buf *[Max]uint64) ([]uint64, *Source) {
	hashes := buf[:0]
	var first *Source
next:
	for i := range sources {
		k := &sources[i]
		if skipShared && k.Shared() {
			continue
		}
		h, ok := k.Hash(r)
		if !ok {
			continue
		}
		for _, seen := range hashes {
			if seen == h {
				continue next
			}
		}
		if len(hashes) == 0 {
			first = k
		}
		hashes = append(hashes, h)
	}
	return hashes, first
}
