package affinity

import (
	"crypto/hmac"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/binary"
	"net/http"
	"strings"
)

// A pin is the proxy's own cookie naming the upstream a session was given.
// Its value is the base64url (no padding) form of an 18-byte token:
//
//	token = HMAC-SHA256(secret, "caddy-affinity/pin/v1\x00" + dial)[:18]
//	        \____ id: bytes 0..5 ____/\______ mac: bytes 6..17 ______/
//
// The id picks the candidate upstream cheaply; the remaining 96 bits are
// compared in constant time. The value names no address, and without the
// secret a client can only replay a pin it was given, which routes it to
// an upstream it could already reach. Because the token depends only on
// the secret and the dial address, every proxy instance with the same
// secret issues and accepts the same pins, and verifying one costs no
// hashing at all: tokens are computed once per pool, not per request.
const (
	pinTokenLen = 18
	pinIDLen    = 6
	// pinValueLen is the cookie value's length: base64 of 18 bytes.
	pinValueLen = pinTokenLen / 3 * 4
	pinLabel    = "caddy-affinity/pin/v1\x00"
)

// pinToken is one upstream's pin.
type pinToken struct {
	id  uint64 // the first 6 bytes of the token, big-endian
	mac [pinTokenLen - pinIDLen]byte
	// value is the cookie value, setCookie and setCookieSecure the
	// complete Set-Cookie header values, precomputed so that issuing a
	// pin only appends a string.
	value, setCookie, setCookieSecure string
}

func newPinToken(secret []byte, dial, cookieName string) pinToken {
	mac := hmac.New(sha256.New, secret)
	mac.Write([]byte(pinLabel))
	mac.Write([]byte(dial))
	sum := mac.Sum(nil)

	var t pinToken
	t.id = pinID(sum[:pinIDLen])
	copy(t.mac[:], sum[pinIDLen:pinTokenLen])
	t.value = base64.RawURLEncoding.EncodeToString(sum[:pinTokenLen])
	// SameSite=Lax: the pin must ride along on top-level navigations
	// from other sites (links into the app) but is never needed on
	// cross-site subrequests. No Max-Age: like the session cookies of the
	// apps we front, it lives as long as the browser session.
	base := (&http.Cookie{Name: cookieName, Value: t.value, Path: "/", HttpOnly: true, SameSite: http.SameSiteLaxMode}).String()
	t.setCookie = base
	t.setCookieSecure = base + "; Secure"
	return t
}

func pinID(b []byte) uint64 {
	var buf [8]byte
	copy(buf[2:], b[:pinIDLen])
	return binary.BigEndian.Uint64(buf[:])
}

// decodePin parses a pin cookie value into its id and mac without
// allocating. ok is false for anything that is not exactly a token.
func decodePin(value string) (id uint64, mac [pinTokenLen - pinIDLen]byte, ok bool) {
	if len(value) != pinValueLen {
		return 0, mac, false
	}
	var raw [pinTokenLen]byte
	var src [pinValueLen]byte
	copy(src[:], value)
	n, err := base64.RawURLEncoding.Decode(raw[:], src[:])
	if err != nil || n != pinTokenLen {
		return 0, mac, false
	}
	copy(mac[:], raw[pinIDLen:])
	return pinID(raw[:pinIDLen]), mac, true
}

// match reports whether a decoded pin is this token, comparing the MAC in
// constant time.
func (t *pinToken) match(id uint64, mac *[pinTokenLen - pinIDLen]byte) bool {
	return t.id == id && subtle.ConstantTimeCompare(t.mac[:], mac[:]) == 1
}

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
