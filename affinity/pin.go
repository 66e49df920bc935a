package affinity

import (
	"crypto/hmac"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/binary"
	"hash"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// A pin is the proxy's own cookie naming the upstream a session was given,
// and when the session was last seen. Its value is the base64url (no
// padding) form of 30 bytes:
//
//	token = HMAC-SHA256(secret, "caddy-affinity/pin/v1\x00" + dial)[:18]
//	        \____ id: bytes 0..5 ____/\______ mac: bytes 6..17 ______/
//	at    = issue time, seconds since tableEpoch, big-endian uint32
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
// A v1 pin (the token alone, 24 chars, issued before pins carried a
// time) is accepted as before and re-issued as v2 on that request; on an
// upstream that takes no new sessions freely only during the first
// session_ttl + refresh + slack of this process, the time it takes every
// live session to come back once and get a v2 pin: after that, a v1 pin
// is an ended session's.
const (
	pinTokenLen = 18
	pinIDLen    = 6
	pinTimeLen  = 4
	pinTagLen   = 8
	pinRawLen   = pinTokenLen + pinTimeLen + pinTagLen
	// pinValueLen is a v2 cookie value's length: base64 of 30 bytes.
	pinValueLen = pinRawLen / 3 * 4
	// pinV1Len is a v1 cookie value's length: base64 of the token.
	pinV1Len    = pinTokenLen / 3 * 4
	pinLabel    = "caddy-affinity/pin/v1\x00"
	pinTagLabel = "caddy-affinity/pin/v2\x00"

	// pinSlack is added to a pin's lifetime for the table clock's
	// granularity and the clocks of instances that share the secret,
	// which must agree within it.
	pinSlack = 2
)

// pinToken is one upstream's pin token.
type pinToken struct {
	id    uint64 // the first 6 bytes of the token, big-endian
	mac   [pinTokenLen - pinIDLen]byte
	token [pinTokenLen]byte
}

func newPinToken(secret []byte, dial string) pinToken {
	mac := hmac.New(sha256.New, secret)
	mac.Write([]byte(pinLabel))
	mac.Write([]byte(dial))
	sum := mac.Sum(nil)

	var t pinToken
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

// decodedPin is a pin cookie's value, parsed.
type decodedPin struct {
	id  uint64
	mac [pinTokenLen - pinIDLen]byte
	// v1 is set for a pin with no time (issued before v2).
	v1 bool
	at uint32 // v2: the issue time, in table seconds
	// tagHead is the tag's first 2 bytes, rest the value's last 8
	// characters (its other 6), decoded only when the tag is checked: the
	// pinned path needs the token and the time alone.
	tagHead [2]byte
	rest    string
}

// pinHeadLen is how much of a v2 value the pinned path decodes: the token
// and the 6 bytes after it (the time and the tag's first 2 bytes), in
// whole base64 quantums.
const pinHeadLen = 32

// decodePin parses a pin cookie value without allocating. ok is false for
// anything that is not exactly a v1 or v2 pin's shape.
func decodePin(value string, p *decodedPin) (ok bool) {
	*p = decodedPin{}
	var src [pinHeadLen]byte
	// raw has room to spare: base64 decodes 8 characters at a time only
	// while 8 bytes of room are left, and byte by byte otherwise.
	var raw [pinHeadLen]byte
	switch len(value) {
	case pinV1Len:
		p.v1 = true
	case pinValueLen:
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
	if !p.v1 {
		p.at = binary.BigEndian.Uint32(raw[pinTokenLen:])
		copy(p.tagHead[:], raw[pinTokenLen+pinTimeLen:])
	}
	return true
}

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

// tag decodes the pin's tag (the value is known to be well formed).
func (p *decodedPin) tag() (tag [pinTagLen]byte, ok bool) {
	var src [pinValueLen - pinHeadLen]byte
	var raw [len(src) / 4 * 3]byte
	if p.v1 || len(p.rest) != len(src) {
		return tag, false
	}
	copy(src[:], p.rest)
	if n, err := base64.RawURLEncoding.Decode(raw[:], src[:]); err != nil || n != len(raw) {
		return tag, false
	}
	copy(tag[:], p.tagHead[:])
	copy(tag[len(p.tagHead):], raw[:])
	return tag, true
}

// age returns how long ago the pin was issued, in seconds (0 for a time
// ahead of now: another instance's clock may run a little ahead).
func (p *decodedPin) age(now uint32) uint32 {
	if p.at >= now {
		return 0
	}
	return now - p.at
}

// match reports whether a decoded pin carries this token, comparing the
// MAC in constant time.
func (t *pinToken) match(p *decodedPin) bool {
	return t.id == p.id && subtle.ConstantTimeCompare(t.mac[:], p.mac[:]) == 1
}

// pinSigner issues the pins of one pool and checks their times. It is
// shared by the copies of a pool state that have the same addresses.
type pinSigner struct {
	secret []byte
	cookie string
	tokens []pinToken // index-aligned with the pool
	// quantum is how long the issued values of one time are reused, in
	// seconds: session_ttl/8, between 1s and a minute, so that issuing
	// stays a string lookup and the pins issued are at most that old.
	quantum uint32

	mu    sync.Mutex // serialises rebuilding stamp
	stamp atomic.Pointer[pinStamp]
	// macs are idle HMACs for checking tags. A channel rather than a
	// sync.Pool: the pool drops items at random under the race detector,
	// and checking a tag must be as free of allocations there as in
	// production for the tests to say so.
	macs chan *pinMAC
}

// pinStamp is the Set-Cookie header values of every upstream's pin for
// one issue time.
type pinStamp struct {
	at                         uint32
	setCookie, setCookieSecure []string
}

// pinMAC is a reusable HMAC with room for its input and output, so that
// checking a tag allocates nothing.
type pinMAC struct {
	h   hash.Hash
	in  [len(pinTagLabel) + pinTokenLen + pinTimeLen]byte // label || token || at
	sum [sha256.Size]byte
}

func newPinSigner(secret []byte, cookie string, ttl uint32, dials []string) *pinSigner {
	s := &pinSigner{secret: secret, cookie: cookie, tokens: make([]pinToken, len(dials))}
	for i, d := range dials {
		s.tokens[i] = newPinToken(secret, d)
	}
	s.quantum = min(max(ttl/8, 1), 60)
	s.macs = make(chan *pinMAC, 16)
	return s
}

func (s *pinSigner) getMAC() *pinMAC {
	select {
	case m := <-s.macs:
		return m
	default:
	}
	m := &pinMAC{h: hmac.New(sha256.New, s.secret)}
	copy(m.in[:], pinTagLabel)
	return m
}

func (s *pinSigner) putMAC(m *pinMAC) {
	select {
	case s.macs <- m:
	default: // enough idle ones
	}
}

// tag computes a v2 pin's tag for token and time at.
func (s *pinSigner) tag(token *[pinTokenLen]byte, at uint32) (tag [pinTagLen]byte) {
	m := s.getMAC()
	m.h.Reset()
	copy(m.in[len(pinTagLabel):], token[:])
	binary.BigEndian.PutUint32(m.in[len(pinTagLabel)+pinTokenLen:], at)
	m.h.Write(m.in[:])
	copy(tag[:], m.h.Sum(m.sum[:0]))
	s.putMAC(m)
	return tag
}

// verify reports whether pin p's tag is the one upstream i's pin for its
// time carries: its time was issued by a proxy with the secret.
func (s *pinSigner) verify(i int, p *decodedPin) bool {
	got, ok := p.tag()
	if !ok {
		return false
	}
	want := s.tag(&s.tokens[i].token, p.at)
	return subtle.ConstantTimeCompare(want[:], got[:]) == 1
}

// value returns upstream i's v2 pin value for time at.
func (s *pinSigner) value(i int, at uint32) string {
	var raw [pinRawLen]byte
	copy(raw[:], s.tokens[i].token[:])
	binary.BigEndian.PutUint32(raw[pinTokenLen:], at)
	tag := s.tag(&s.tokens[i].token, at)
	copy(raw[pinTokenLen+pinTimeLen:], tag[:])
	return base64.RawURLEncoding.EncodeToString(raw[:])
}

// setCookie returns the Set-Cookie header value that issues upstream i's
// pin now. The values of one time are built once for every upstream and
// reused for a quantum: issuing a pin allocates nothing but the header.
func (s *pinSigner) setCookie(i int, now uint32, secure bool) string {
	st := s.stamp.Load()
	if st == nil || now-st.at >= s.quantum || now < st.at {
		st = s.restamp(now)
	}
	if secure {
		return st.setCookieSecure[i]
	}
	return st.setCookie[i]
}

func (s *pinSigner) restamp(now uint32) *pinStamp {
	s.mu.Lock()
	defer s.mu.Unlock()
	if st := s.stamp.Load(); st != nil && now-st.at < s.quantum && now >= st.at {
		return st // another request rebuilt it meanwhile
	}
	st := &pinStamp{at: now, setCookie: make([]string, len(s.tokens)), setCookieSecure: make([]string, len(s.tokens))}
	for i := range s.tokens {
		// SameSite=Lax: the pin must ride along on top-level navigations
		// from other sites (links into the app) but is never needed on
		// cross-site subrequests. No Max-Age: like the session cookies of
		// the apps we front, it lives as long as the browser session; its
		// time, not its expiry, says whether its session is live.
		base := (&http.Cookie{Name: s.cookie, Value: s.value(i, now), Path: "/", HttpOnly: true, SameSite: http.SameSiteLaxMode}).String()
		st.setCookie[i] = base
		st.setCookieSecure[i] = base + "; Secure"
	}
	s.stamp.Store(st)
	return st
}

// pinRefresh is how old a pin may get before it is issued again, in
// seconds: a quarter of session_ttl, at least a second.
func pinRefresh(ttl uint32) uint32 { return max(ttl/4, 1) }

// pinLifetime is the oldest a live session's pin can be, in seconds: a
// session's requests come at most session_ttl apart, and after each its
// pin is younger than the refresh interval (the quantum is shorter).
func pinLifetime(ttl uint32) uint32 { return ttl + pinRefresh(ttl) + pinSlack }

// processStart is when this process started, in table seconds: v1 pins
// count as live sessions' for one pin lifetime after it (see above).
var processStart = tableNow(time.Now())

// setPinCookie adds the pin's Set-Cookie header to the response,
// replacing one set by an earlier attempt of the same request (Caddy
// calls Select again on each retry).
func setPinCookie(h http.Header, cookieName, value string, replace bool) {
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
