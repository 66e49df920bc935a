// Package pin is the proxy's own cookie that remembers a session's
// upstream: its wire format (token, time, bind, tag), the signer that
// issues and checks the pins of one pool under the current and previous
// secrets, the cookie's attributes, the secret kept in Caddy's storage
// and the upgrade window of old-format pins. It is beneath the policy:
// it knows upstreams by their position in a pool and dial address, and
// nothing of keys' sources, the table or placement (a pin is bound to a
// key by its hash alone).
package pin

import (
	"crypto/hmac"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/caddy-affinity/caddy-affinity/affinity/sessions"
)

// A pin is the proxy's own cookie naming the upstream a session was given,
// and when the session was last seen. Its value is the base64url (no
// padding) form of 30 bytes:
//
//	token = HMAC-SHA256(secret, "caddy-affinity/pin/v1\x00" + dial)[:18]
//	        \____ id: bytes 0..5 ____/\______ mac: bytes 6..17 ______/
//	at    = issue time, seconds since sessions.Epoch, big-endian uint32
//	tag   = HMAC-SHA256(secret, "caddy-affinity/pin/v2\x00" + token + at)[:8]
//	value = base64url(token || at || tag)                     (40 chars)
//
// The token names the upstream: the id picks the candidate cheaply, the
// remaining 96 bits are compared in constant time. It depends only on the
// secret and the dial address, so every proxy instance with the same
// secret issues and accepts the same pins, and checking it costs no
// hashing: tokens are computed once per pool, not per request.
//
// The time ties the pin to a live session. A pin is re-issued with a
// fresh time once it is older than the refresh interval (session_ttl/4),
// so a session with requests at most session_ttl apart always carries a
// pin younger than session_ttl + refresh. Only an upstream that takes no
// new sessions freely (draining, weight 0, slow start, in trouble) needs
// to know: there an older pin is an ended session's, and its request is
// a new session, placed by the ring. Only then is the tag checked (one
// HMAC), so that a forged time cannot pass for a live session; on an
// upstream that takes new sessions anyway a pin could only bring what
// the ring may bring, and the pinned path stays as cheap as the token.
//
// Secrets rotate: pins are issued with the current secret and accepted
// with it or any previous one (previous_secrets). A pin of a previous
// secret is matched against that secret's tokens only once the current
// ones found nothing (so a current pin costs nothing more), its tag is
// checked with that secret, and it is issued again with the current one
// on that request, like a v1 pin.
//
// A v3 pin also binds the session it was issued to: the top bit of its
// time marks it (table seconds never reach it), and the 8 bytes after
// the time are
//
//	bind  = 3 bytes of the hash of the request's first key, 0 for none
//	tag   = HMAC-SHA256(secret, "caddy-affinity/pin/v3\x00" + token + at + bind)[:5]
//
// so that it stays 40 characters. Where the time is checked (an upstream
// that takes no new sessions freely), a pin bound to a key is honoured
// only for a request that carries that key: a browser that logged out
// and in again carries its old pin next to a new app session, which is
// a new session there, not the pinned one. A pin issued before the app
// gave its session a key (bind 0) is honoured for the first key it comes
// with and bound to it on that request; everywhere else a pin bound to
// another key than the request's first one is bound again, one
// Set-Cookie per change of key. The tag is 40 bits: forging one buys a
// single new session on a draining upstream per 2^40 tries.
//
// Older pins, a v1 pin (the token alone, 24 chars, issued before pins
// carried a time) and a v2 pin (30 bytes, an 8-byte tag, no bind), are
// accepted as before and re-issued as v3 on that request; on an upstream
// that takes no new sessions freely only during the upgrade window: one
// pin lifetime (session_ttl + refresh + slack) from the first start of a
// v3 instance on the storage, recorded once there (OpenUpgradeWindow), the
// time it takes every live session to come back once and get a v3 pin.
// After that, an old pin is an ended session's, or a current one cut
// short.
const (
	pinTokenLen = 18
	pinIDLen    = 6
	pinTimeLen  = 4
	pinTagLen   = 8
	pinRawLen   = pinTokenLen + pinTimeLen + pinTagLen
	// ValueLen is a v2 cookie value's length: base64 of 30 bytes.
	ValueLen = pinRawLen / 3 * 4
	// pinV1Len is a v1 cookie value's length: base64 of the token.
	pinV1Len    = pinTokenLen / 3 * 4
	pinLabel    = "caddy-affinity/pin/v1\x00"
	pinTagLabel = "caddy-affinity/pin/v2\x00"
	// pinBindLabel labels a v3 tag (same length as pinTagLabel).
	pinBindLabel = "caddy-affinity/pin/v3\x00"
	// pinBindLen is a v3 pin's bind, pinBindTagLen its shorter tag.
	pinBindLen    = 3
	pinBindTagLen = pinTagLen - pinBindLen
	// pinV3Bit marks a v3 pin in its time.
	pinV3Bit = 1 << 31

	// Slack is added to a pin's lifetime for the table clock's
	// granularity and the clocks of instances that share the secret,
	// which must agree within it.
	Slack = 2
)

// Token is one upstream's pin token.
type Token struct {
	id    uint64 // the first 6 bytes of the token, big-endian
	mac   [pinTokenLen - pinIDLen]byte
	token [pinTokenLen]byte
}

func NewToken(secret []byte, dial string) Token {
	mac := hmac.New(sha256.New, secret)
	mac.Write([]byte(pinLabel))
	mac.Write([]byte(dial))
	sum := mac.Sum(nil)

	var t Token
	copy(t.token[:], sum[:pinTokenLen])
	t.id = pinID(sum[:pinIDLen])
	copy(t.mac[:], sum[pinIDLen:pinTokenLen])
	return t
}

func pinID(b []byte) uint64 {
	var buf [8]byte
	copy(buf[2:], b[:pinIDLen])
	return binary.BigEndian.Uint64(buf[:])
}

// Decoded is a pin cookie's value, parsed.
type Decoded struct {
	id  uint64
	mac [pinTokenLen - pinIDLen]byte
	// v1 is set for a pin with no time (issued before v2), v3 for one
	// that binds its session (bind: 0 if issued keyless).
	v1, v3 bool
	bind   uint32
	// key is the secret whose token matched: 0 the current one, k the
	// previous one at k-1. Set by Signer.index.
	key uint8
	at  uint32 // v2, v3: the issue time, in table seconds (v3 bit cleared)
	// tagHead is the tag's first 5 bytes (v2) or 2 bytes (v3, after the
	// bind), rest the value's last 4 characters (the tag's last 3 bytes),
	// decoded only when the tag is checked: the pinned path needs the
	// token, the time and the bind alone.
	tagHead [5]byte
	rest    string
}

// pinHeadLen is how much of a v2 or v3 value the pinned path decodes:
// the token and the 9 bytes after it (the time, then the bind and the
// tag's first bytes), in whole base64 quantums.
const pinHeadLen = 36

// Decode parses a pin cookie value without allocating. ok is false for
// anything that is not exactly a v1 or v2 pin's shape.
func Decode(value string, p *Decoded) (ok bool) {
	*p = Decoded{}
	var src [pinHeadLen]byte
	// raw has room to spare: base64 decodes 8 characters at a time only
	// while 8 bytes of room are left, and byte by byte otherwise.
	var raw [pinHeadLen]byte
	switch len(value) {
	case pinV1Len:
		p.v1 = true
	case ValueLen:
		p.rest = value[pinHeadLen:]
		if !base64Chars(p.rest) {
			return false
		}
		value = value[:pinHeadLen]
	default:
		return false
	}
	copy(src[:], value)
	n, err := base64.RawURLEncoding.Decode(raw[:], src[:len(value)])
	if err != nil || n != len(value)/4*3 {
		return false
	}
	p.id = pinID(raw[:pinIDLen])
	copy(p.mac[:], raw[pinIDLen:pinTokenLen])
	if p.v1 {
		return true
	}
	p.at = binary.BigEndian.Uint32(raw[pinTokenLen:])
	after := raw[pinTokenLen+pinTimeLen : pinHeadLen/4*3]
	if p.at&pinV3Bit != 0 {
		p.v3, p.at = true, p.at&^pinV3Bit
		p.bind = uint32(after[0])<<16 | uint32(after[1])<<8 | uint32(after[2])
		after = after[pinBindLen:]
	}
	copy(p.tagHead[:], after)
	return true
}

// bindOfKey is the bind of a session known by key (its first key's hash),
// never 0 (which means no key).
func bindOfKey(key uint64) uint32 { return max(uint32(key>>40), 1) }

// bindOf is the bind of a request with keys: its first key's, or 0.
func bindOf(keys []uint64) uint32 {
	if len(keys) == 0 {
		return 0
	}
	return bindOfKey(keys[0])
}

// boundTo reports whether the pin was issued to the session of a request
// with keys: a pin bound to no key (an old one, or one issued before the
// app gave its session a key) is any session's; a pin bound to a key is
// that key's session only, and a request without a key is another one
// (its app session ended: logged out).
func (p *Decoded) boundTo(keys []uint64) bool {
	if !p.v3 || p.bind == 0 {
		return true
	}
	for _, k := range keys {
		if bindOfKey(k) == p.bind {
			return true
		}
	}
	return false
}

// Rebind reports whether the pin is to be issued again bound to the
// request's first key: it is bound to none or to another. A request
// without keys keeps the pin's bind.
func (p *Decoded) Rebind(keys []uint64) bool {
	return p.v3 && len(keys) > 0 && p.bind != bindOfKey(keys[0])
}

// V3 reports whether the pin is of the current format (it binds its
// session); an old one (v1, v2) counts only during the upgrade window.
func (p *Decoded) V3() bool { return p.v3 }

// Bind is the bind of a v3 pin: 3 bytes of the hash of the key it was
// issued to, 0 for none.
func (p *Decoded) Bind() uint32 { return p.bind }

// PreviousSecret reports whether the pin carries a previous secret's
// token (set by Signer.Index): it is issued again with the current one.
func (p *Decoded) PreviousSecret() bool { return p.key != 0 }

// Parsed reports whether Decode read a pin's shape (it sets the id only
// then): a value that is not valid for the pool but is well formed is
// another secret's, or a forged one.
func (p *Decoded) Parsed() bool { return p.id != 0 }

// base64Chars reports whether s is made of base64url characters only, so
// that a value whose tag is garbage is no pin at all, as before v2.
func base64Chars(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('A' <= c && c <= 'Z' || 'a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '-' || c == '_') {
			return false
		}
	}
	return true
}

// tag decodes the pin's tag (the value is known to be well formed): 8
// bytes for v2, the first 5 for v3.
func (p *Decoded) tag() (tag [pinTagLen]byte, ok bool) {
	var src [ValueLen - pinHeadLen]byte
	var raw [len(src) / 4 * 3]byte
	if p.v1 || len(p.rest) != len(src) {
		return tag, false
	}
	copy(src[:], p.rest)
	if n, err := base64.RawURLEncoding.Decode(raw[:], src[:]); err != nil || n != len(raw) {
		return tag, false
	}
	head := len(p.tagHead)
	if p.v3 {
		head -= pinBindLen
	}
	copy(tag[:], p.tagHead[:head])
	copy(tag[head:], raw[:])
	return tag, true
}

// Age returns how long ago the pin was issued, in seconds (0 for a time
// ahead of now: another instance's clock may run a little ahead).
func (p *Decoded) Age(now uint32) uint32 {
	if p.at >= now {
		return 0
	}
	return now - p.at
}

// Due reports whether the pin is to be issued again on this request: an
// old (v1, v2) pin, one signed with a previous secret, or one older than
// the refresh interval.
func (p *Decoded) Due(now, ttl uint32) bool {
	return !p.v3 || p.key != 0 || p.Age(now) >= Refresh(ttl)
}

// Match reports whether a decoded pin carries this token, comparing the
// MAC in constant time.
func (t *Token) Match(p *Decoded) bool {
	return t.id == p.id && subtle.ConstantTimeCompare(t.mac[:], p.mac[:]) == 1
}

// secretKey is one secret's pin tokens for a pool, and the HMACs that check
// its tags.
type secretKey struct {
	secret []byte
	tokens []Token // index-aligned with the pool
	// macs are idle HMACs for checking tags. A channel rather than a
	// sync.Pool: the pool drops items at random under the race detector,
	// and checking a tag must be as free of allocations there as in
	// production for the tests to say so.
	macs chan *tagMAC
}

func newKey(secret []byte, dials []string) secretKey {
	k := secretKey{secret: secret, tokens: make([]Token, len(dials)), macs: make(chan *tagMAC, 16)}
	for i, d := range dials {
		k.tokens[i] = NewToken(secret, d)
	}
	return k
}

// Signer issues the pins of one pool and checks their times. It is
// shared by the copies of a pool state that have the same addresses.
type Signer struct {
	secretKey // the current secret: the one pins are issued with
	// previous are the previous secrets' keys: their pins are accepted
	// and issued again with the current one.
	previous []secretKey
	cookie   string
	style    Style
	// quantum is how long the issued values of one time are reused, in
	// seconds: session_ttl/8, between 1s and a minute, so that issuing
	// stays a string lookup and the pins issued are at most that old.
	quantum uint32

	mu    sync.Mutex // serialises rebuilding stamp
	stamp atomic.Pointer[stamp]
}

// stamp is the Set-Cookie header values of every upstream's pin for
// one issue time. With Secure forced (same_site none, partitioned,
// secure always) both slices are the same.
type stamp struct {
	at                         uint32
	setCookie, setCookieSecure []string
}

// mac is a reusable HMAC with room for its input and output, so that
// checking a tag allocates nothing.
type tagMAC struct {
	h   hash.Hash
	in  [len(pinTagLabel) + pinTokenLen + pinTimeLen + pinBindLen]byte // label || token || at [|| bind]
	sum [sha256.Size]byte
}

// NewSigner returns the signer of the pool whose upstreams are dialled at
// dials: pins issued with secret under the cookie name and style, and
// accepted with it or one of the previous secrets (at most 255,
// Decoded.key; the config allows far fewer). ttl is session_ttl in
// seconds.
func NewSigner(secret []byte, previous [][]byte, cookie string, ttl uint32, style Style, dials []string) *Signer {
	s := &Signer{secretKey: newKey(secret, dials), cookie: cookie, style: style}
	s.quantum = min(max(ttl/8, 1), 60)
	for _, secret := range previous[:min(len(previous), 255)] {
		s.previous = append(s.previous, newKey(secret, dials))
	}
	return s
}

// Index returns the position of the upstream pin p names, or -1, and
// records in p which secret's token it carries. The current secret's
// tokens are tried first: only a pin of no current upstream costs the
// previous secrets' tokens, one token comparison each in practice (the
// 48-bit id tells the candidate).
func (s *Signer) Index(p *Decoded) int {
	for i := range s.tokens {
		if s.tokens[i].Match(p) {
			return i
		}
	}
	for k := range s.previous {
		for i := range s.previous[k].tokens {
			if s.previous[k].tokens[i].Match(p) {
				p.key = uint8(k + 1)
				return i
			}
		}
	}
	return -1
}

// keyOf returns the key whose token pin p carries (see index).
func (s *Signer) keyOf(p *Decoded) *secretKey {
	if p.key == 0 || int(p.key) > len(s.previous) {
		return &s.secretKey
	}
	return &s.previous[p.key-1]
}

func (k *secretKey) getMAC() *tagMAC {
	select {
	case m := <-k.macs:
		return m
	default:
	}
	return &tagMAC{h: hmac.New(sha256.New, k.secret)}
}

func (k *secretKey) putMAC(m *tagMAC) {
	select {
	case k.macs <- m:
	default: // enough idle ones
	}
}

// tag computes a v2 pin's tag for token and time at.
func (k *secretKey) tag(token *[pinTokenLen]byte, at uint32) (tag [pinTagLen]byte) {
	return k.mac(pinTagLabel, token, at, nil)
}

// bindTag computes a v3 pin's tag for token, time at and bind.
func (k *secretKey) bindTag(token *[pinTokenLen]byte, at, bind uint32) (tag [pinTagLen]byte) {
	b := [pinBindLen]byte{byte(bind >> 16), byte(bind >> 8), byte(bind)}
	tag = k.mac(pinBindLabel, token, at|pinV3Bit, b[:])
	clear(tag[pinBindTagLen:])
	return tag
}

func (k *secretKey) mac(label string, token *[pinTokenLen]byte, at uint32, bind []byte) (tag [pinTagLen]byte) {
	m := k.getMAC()
	m.h.Reset()
	n := copy(m.in[:], label)
	n += copy(m.in[n:], token[:])
	binary.BigEndian.PutUint32(m.in[n:], at)
	n += pinTimeLen
	n += copy(m.in[n:], bind)
	m.h.Write(m.in[:n])
	copy(tag[:], m.h.Sum(m.sum[:0]))
	k.putMAC(m)
	return tag
}

// Verify reports whether pin p's tag is the one upstream i's pin for its
// time (and bind) carries: it was issued by a proxy with the secret.
func (s *Signer) Verify(i int, p *Decoded) bool {
	got, ok := p.tag()
	if !ok {
		return false
	}
	k := s.keyOf(p) // the secret, current or previous, whose token it carries
	var want [pinTagLen]byte
	if p.v3 {
		want = k.bindTag(&k.tokens[i].token, p.at, p.bind)
	} else {
		want = k.tag(&k.tokens[i].token, p.at)
	}
	return subtle.ConstantTimeCompare(want[:], got[:]) == 1
}

// Value returns upstream i's v3 pin value for time at, bound to no key.
func (s *Signer) Value(i int, at uint32) string { return s.BoundValue(i, at, 0) }

// BoundValue returns upstream i's v3 pin value for time at and bind.
func (s *Signer) BoundValue(i int, at, bind uint32) string {
	var buf [ValueLen]byte
	return string(s.appendValue(buf[:0], i, at, bind))
}

// appendValue appends upstream i's v3 pin value for time at and bind.
func (s *Signer) appendValue(dst []byte, i int, at, bind uint32) []byte {
	var raw [pinRawLen]byte
	n := copy(raw[:], s.tokens[i].token[:])
	binary.BigEndian.PutUint32(raw[n:], at|pinV3Bit)
	n += pinTimeLen
	raw[n], raw[n+1], raw[n+2] = byte(bind>>16), byte(bind>>8), byte(bind)
	n += pinBindLen
	tag := s.bindTag(&s.tokens[i].token, at, bind)
	copy(raw[n:], tag[:pinBindTagLen])
	return base64.RawURLEncoding.AppendEncode(dst, raw[:])
}

// V1Value returns upstream i's v1 pin value (the token alone), as
// versions before v2 issued it; for tests of the upgrade path.
func (s *Signer) V1Value(i int) string {
	return base64.RawURLEncoding.EncodeToString(s.tokens[i].token[:])
}

// V2Value returns upstream i's v2 pin value for time at, as versions
// before v3 issued it; for tests of the upgrade path.
func (s *Signer) V2Value(i int, at uint32) string {
	var raw [pinRawLen]byte
	copy(raw[:], s.tokens[i].token[:])
	binary.BigEndian.PutUint32(raw[pinTokenLen:], at)
	tag := s.tag(&s.tokens[i].token, at)
	copy(raw[pinTokenLen+pinTimeLen:], tag[:])
	return base64.RawURLEncoding.EncodeToString(raw[:])
}

// SetCookie returns the Set-Cookie header value that issues upstream i's
// pin now, bound to bind (0: to no key). The unbound values of one time
// are built once for every upstream and reused for a quantum: issuing
// one allocates nothing but the header; a bound one is the unbound one
// with the value replaced, one string built per issue.
func (s *Signer) SetCookie(i int, now uint32, secure bool, bind uint32) string {
	st := s.stampAt(now)
	c := st.setCookie[i]
	if secure {
		c = st.setCookieSecure[i]
	}
	if bind == 0 {
		return c
	}
	at := st.at // the time of c's value
	prefix := len(s.cookie) + 1
	if len(c) < prefix+ValueLen {
		return c
	}
	var value [ValueLen]byte
	var b strings.Builder
	b.Grow(len(c)) // the one allocation
	b.WriteString(c[:prefix])
	b.Write(s.appendValue(value[:0], i, at, bind))
	b.WriteString(c[prefix+ValueLen:])
	return b.String()
}

// stampAt returns the stamp for now, rebuilt once a quantum.
func (s *Signer) stampAt(now uint32) *stamp {
	st := s.stamp.Load()
	if st == nil || now-st.at >= s.quantum || now < st.at {
		st = s.restamp(now)
	}
	return st
}

func (s *Signer) restamp(now uint32) *stamp {
	s.mu.Lock()
	defer s.mu.Unlock()
	if st := s.stamp.Load(); st != nil && now-st.at < s.quantum && now >= st.at {
		return st // another request rebuilt it meanwhile
	}
	st := &stamp{at: now, setCookie: make([]string, len(s.tokens))}
	st.setCookieSecure = st.setCookie
	if !s.style.alwaysSecure() {
		st.setCookieSecure = make([]string, len(s.tokens))
	}
	// The attributes are the operator's (Attributes); by default
	// SameSite=Lax, because the pin must ride along on top-level
	// navigations from other sites (links into the app) but is not
	// needed on cross-site subrequests, and no Max-Age, because like the
	// session cookies of the apps we front it lives as long as the
	// browser session: its time, not its expiry, says whether its session
	// is live. The strings are built here, once a quantum, so that
	// issuing stays a lookup.
	for i := range s.tokens {
		c := s.style.cookie(s.cookie, s.Value(i, now))
		st.setCookie[i] = c.String()
		if !s.style.alwaysSecure() {
			c.Secure = true
			st.setCookieSecure[i] = c.String()
		}
	}
	s.stamp.Store(st)
	return st
}

// Attributes are the pin cookie's attributes beyond its name
// and value (JSON "pin_cookie_attributes"). Every field is optional; the
// defaults are the cookie issued before they existed: Path=/, HttpOnly,
// SameSite=Lax, Secure on HTTPS requests, no Domain, no Max-Age.
type Attributes struct {
	// Domain widens the cookie to the domain's subdomains (a host name,
	// optionally with a leading dot, or an IP address). Default none: the
	// cookie belongs to the host that set it.
	Domain string `json:"domain,omitempty"`
	// Path is the cookie's path; default "/".
	Path string `json:"path,omitempty"`
	// SameSite is "lax" (default), "strict" or "none". "none" lets the
	// pin ride along in cross-site subrequests (the app in an iframe of
	// another site) and makes the cookie Secure on every response:
	// browsers drop SameSite=None cookies that are not.
	SameSite string `json:"same_site,omitempty"`
	// Secure is "auto" (default: Secure when the client reached the proxy
	// over TLS, directly or per a trusted proxy's X-Forwarded-Proto) or
	// "always". With same_site none or partitioned it is always on, and
	// an explicit "auto" is a configuration error.
	Secure string `json:"secure,omitempty"`
	// MaxAge makes the pin a persistent cookie that expires this long
	// after it was last issued (whole seconds, at least 1s). Default: a
	// browser-session cookie, like the session cookies of the apps we
	// front. Whether a pin is a live session's is told by the time it
	// carries, never by its expiry; a max_age shorter than session_ttl +
	// session_ttl/4 (the oldest a live session's pin can get) is allowed,
	// but a session idle that long loses its pin (a warning is logged).
	MaxAge caddy.Duration `json:"max_age,omitempty"`
	// Partitioned sets the CHIPS attribute for an app embedded in other
	// sites' pages: the browser keeps a separate pin per top-level site,
	// and sends it even where third-party cookies are blocked. It implies
	// Secure like same_site none; browsers take it for cross-site
	// iframes with same_site none.
	Partitioned bool `json:"partitioned,omitempty"`
}

// Style is Attributes, checked and ready to build cookies.
type Style struct {
	path, domain string
	sameSite     http.SameSite
	maxAge       int  // seconds; 0: a browser-session cookie
	secure       bool // secure always
	partitioned  bool
}

// defaultStyle is the cookie issued before the attributes existed.
var defaultStyle = Style{path: "/", sameSite: http.SameSiteLaxMode}

// alwaysSecure reports whether every pin is Secure, whatever the request
// came over.
func (st Style) alwaysSecure() bool {
	return st.secure || st.sameSite == http.SameSiteNoneMode || st.partitioned
}

// cookie returns the pin cookie for value in this style (Secure only if
// it is always secure; the caller adds it for HTTPS requests).
func (st Style) cookie(name, value string) *http.Cookie {
	return &http.Cookie{
		Name: name, Value: value,
		Path: st.path, Domain: st.domain, MaxAge: st.maxAge,
		// HttpOnly: the pin is the proxy's, no script of the app's needs
		// it.
		HttpOnly:    true,
		SameSite:    st.sameSite,
		Secure:      st.alwaysSecure(),
		Partitioned: st.partitioned,
	}
}

// Style checks the attributes and returns the style they make. a may be
// nil (the defaults).
func (a *Attributes) Style() (Style, error) {
	st := defaultStyle
	if a == nil {
		return st, nil
	}
	if a.Domain != "" {
		if !validCookieDomain(a.Domain) {
			return st, fmt.Errorf("pin_cookie domain: %q is not a host name or IP address", a.Domain)
		}
		st.domain = a.Domain
	}
	if a.Path != "" {
		if !validCookiePath(a.Path) {
			return st, fmt.Errorf("pin_cookie path: %q must start with '/' and have no ';', spaces or control characters", a.Path)
		}
		st.path = a.Path
	}
	switch a.SameSite {
	case "", "lax":
	case "strict":
		st.sameSite = http.SameSiteStrictMode
	case "none":
		st.sameSite = http.SameSiteNoneMode
	default:
		return st, fmt.Errorf("pin_cookie same_site: %q is not lax, strict or none", a.SameSite)
	}
	switch a.Secure {
	case "", "auto":
	case "always":
		st.secure = true
	default:
		return st, fmt.Errorf("pin_cookie secure: %q is not auto or always", a.Secure)
	}
	st.partitioned = a.Partitioned
	if a.Secure == "auto" && (st.sameSite == http.SameSiteNoneMode || st.partitioned) {
		return st, ErrSecureAuto
	}
	switch d := time.Duration(a.MaxAge); {
	case d < 0:
		return st, fmt.Errorf("pin_cookie max_age: %s is negative; leave it out for a browser-session cookie", d)
	case d > 0 && d < time.Second:
		return st, fmt.Errorf("pin_cookie max_age: %s is less than a second (Max-Age counts whole seconds)", d)
	case d > maxPinMaxAge:
		return st, fmt.Errorf("pin_cookie max_age: %s is more than %s, the most browsers keep a cookie", d, maxPinMaxAge)
	}
	st.maxAge = int(time.Duration(a.MaxAge) / time.Second)
	return st, nil
}

// ErrSecureAuto is the error for secure auto with same_site none or
// partitioned: the config names the secure line for it.
var ErrSecureAuto = errors.New("pin_cookie: same_site none and partitioned need the Secure attribute on every response (browsers drop such cookies without it), which secure auto does not promise; write secure always, or leave secure out")

// maxPinMaxAge is the longest Max-Age browsers honour (Chromium caps
// cookie lifetimes at 400 days).
const maxPinMaxAge = 400 * 24 * time.Hour

// validCookiePath reports whether p is a path attribute a browser keeps
// as given: absolute, with no ';', spaces or control characters.
func validCookiePath(p string) bool {
	if p == "" || p[0] != '/' {
		return false
	}
	for i := 0; i < len(p); i++ {
		if c := p[i]; c <= ' ' || c == ';' || c >= 0x7f {
			return false
		}
	}
	return true
}

// validCookieDomain reports whether d is a domain attribute net/http
// writes (it drops others, logging): an IPv4 address, or a host name of
// labels of letters, digits and inner '-' (one letter at least), with
// an optional leading dot.
func validCookieDomain(d string) bool {
	if ip := net.ParseIP(d); ip != nil {
		return !strings.Contains(d, ":")
	}
	d = strings.TrimPrefix(d, ".")
	if d == "" || len(d) > 255 {
		return false
	}
	letter := false
	for _, label := range strings.Split(d, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for i := 0; i < len(label); i++ {
			switch c := label[i]; {
			case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z':
				letter = true
			case '0' <= c && c <= '9', c == '-':
			default:
				return false
			}
		}
	}
	return letter
}

// Refresh is how old a pin may get before it is issued again, in
// seconds: a quarter of session_ttl, at least a second.
func Refresh(ttl uint32) uint32 { return max(ttl/4, 1) }

// Lifetime is the oldest a live session's pin can be, in seconds: a
// session's requests come at most session_ttl apart, and after each its
// pin is younger than the refresh interval (the quantum is shorter).
func Lifetime(ttl uint32) uint32 { return ttl + Refresh(ttl) + Slack }

// processStart is this process's start, in table seconds: where the
// upgrade window of old (v1, v2) pins opens when Caddy's storage cannot
// tell (OpenUpgradeWindow).
var processStart = sessions.Seconds(time.Now())

// InUpgrade reports whether an old pin may still be a live session's at
// now, for pins of lifetime life, in the upgrade window that opened at
// start (OpenUpgradeWindow).
func InUpgrade(now, life, start uint32) bool {
	return now < start || now-start <= life
}

// Live reports whether pin p, naming upstream i, is a live session's and
// this request's session: younger than a live session's pin can be
// (Lifetime), with a tag that proves its time and bind (one HMAC, only
// here), and bound to one of the request's keys (their hashes). forged
// is set for a tag that does not verify. An old pin (v1, v2) counts only
// during the upgrade window that opened at upgradeStart. ttl is
// session_ttl in seconds.
func (s *Signer) Live(i int, p *Decoded, now, ttl, upgradeStart uint32, keys []uint64) (live, forged bool) {
	life := Lifetime(ttl)
	if !p.v3 && !InUpgrade(now, life, upgradeStart) {
		return false, false
	}
	if p.v1 {
		return true, false
	}
	if p.Age(now) > life {
		return false, false // no need to check the tag: an old time gains nothing
	}
	if !s.Verify(i, p) {
		return false, true
	}
	return p.boundTo(keys), false
}

// MaxAge is the cookie's Max-Age (0: a browser-session cookie).
func (st Style) MaxAge() time.Duration { return time.Duration(st.maxAge) * time.Second }

// AddSetCookie adds the pin's Set-Cookie header to the response,
// replacing one set by an earlier attempt of the same request (Caddy
// calls Select again on each retry).
func AddSetCookie(h http.Header, cookieName, value string, replace bool) {
	if replace {
		prefix := cookieName + "="
		kept := h["Set-Cookie"][:0]
		for _, v := range h["Set-Cookie"] {
			if !strings.HasPrefix(v, prefix) {
				kept = append(kept, v)
			}
		}
		h["Set-Cookie"] = kept
	}
	h["Set-Cookie"] = append(h["Set-Cookie"], value)
}

// BindIssued binds the pin that the response headers h issue for
// upstream i (Select put its Set-Cookie there) to the session key the app
// issued in that same response (affinity_learn saw it), so that the
// session's next request finds its pin bound and it is not issued again.
// A pin that is bound to that key already, or names another upstream, is
// left alone.
func (s *Signer) BindIssued(h http.Header, i int, key uint64) {
	prefix := len(s.cookie) + 1
	lines := h["Set-Cookie"]
	for n, line := range lines {
		if len(line) < prefix+ValueLen || line[:prefix-1] != s.cookie || line[prefix-1] != '=' {
			continue
		}
		var pin Decoded
		value := line[prefix : prefix+ValueLen]
		if !Decode(value, &pin) || !pin.v3 || s.Index(&pin) != i || pin.key != 0 {
			return
		}
		if bind := bindOfKey(key); pin.bind != bind {
			lines[n] = line[:prefix] + s.BoundValue(i, pin.at, bind) + line[prefix+ValueLen:]
		}
		return
	}
}

// BindFor is the bind of the pin a decision issues: the request's
// first key, except for a session that moved (moved: its upstream could
// not serve it), whose app on the new upstream does not know the key and
// issues its own, which the session's next request brings (and binds the
// pin to), or affinity_learn binds it to at once (BindIssued).
func BindFor(moved bool, keys []uint64) uint32 {
	if moved {
		return 0
	}
	return bindOf(keys)
}
