package pin

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/caddy-affinity/caddy-affinity/affinity/sessions"
)

func TestPinTokenRoundTrip(t *testing.T) {
	dials := []string{"10.0.0.1:80", "10.0.0.2:80"}
	s := NewSigner([]byte("s"), nil, "pin", 1200, defaultStyle, dials)
	other := NewSigner([]byte("other"), nil, "pin", 1200, defaultStyle, dials)
	a, b, c := s.Value(0, 1000), s.Value(1, 1000), other.Value(0, 1000)
	if len(a) != ValueLen || ValueLen != 40 {
		t.Fatalf("pin value %q has length %d", a, len(a))
	}
	if a == b || a == c {
		t.Fatal("pins do not depend on upstream and secret")
	}
	if again := NewSigner([]byte("s"), nil, "pin", 60, defaultStyle, dials).Value(0, 1000); again != a {
		t.Fatal("pin is not deterministic: instances would disagree")
	}
	if strings.Contains(a, "10.0.0.1") {
		t.Fatal("pin names the address")
	}
	var pin Decoded
	ok := Decode(a, &pin)
	if !ok || pin.v1 || pin.at != 1000 || !s.tokens[0].Match(&pin) || s.tokens[1].Match(&pin) || other.tokens[0].Match(&pin) {
		t.Fatalf("pin %+v does not verify against exactly its own token", pin)
	}
	if !s.Verify(0, &pin) || other.Verify(0, &pin) {
		t.Fatal("the pin's tag does not verify against exactly its own secret")
	}
}

// TestPinWireFormats pins the wire formats down: instances of other versions
// that share the secret must read and write the same bytes.
func TestPinWireFormats(t *testing.T) {
	secret, dial := []byte("format-secret"), "10.0.0.9:8080"
	s := NewSigner(secret, nil, "pin", 1200, defaultStyle, []string{dial})
	raw, err := base64.RawURLEncoding.DecodeString(s.V2Value(0, 0x01020304))
	if err != nil || len(raw) != 30 {
		t.Fatalf("value decodes to %d bytes (%v), want 30", len(raw), err)
	}
	m := hmac.New(sha256.New, secret)
	m.Write([]byte("caddy-affinity/pin/v1\x00" + dial))
	token := m.Sum(nil)[:18]
	m = hmac.New(sha256.New, secret)
	m.Write([]byte("caddy-affinity/pin/v2\x00"))
	m.Write(token)
	m.Write([]byte{1, 2, 3, 4})
	tag := m.Sum(nil)[:8]
	if string(raw[:18]) != string(token) || binary.BigEndian.Uint32(raw[18:22]) != 0x01020304 || string(raw[22:]) != string(tag) {
		t.Fatalf("value bytes %x, want token %x, time 01020304, tag %x", raw, token, tag)
	}
	// A v3 pin: the time with its top bit set, the bind, a 5-byte tag
	// over both.
	raw, err = base64.RawURLEncoding.DecodeString(s.BoundValue(0, 0x01020304, 0xaabbcc))
	if err != nil || len(raw) != 30 {
		t.Fatalf("v3 value decodes to %d bytes (%v), want 30", len(raw), err)
	}
	m = hmac.New(sha256.New, secret)
	m.Write([]byte("caddy-affinity/pin/v3\x00"))
	m.Write(token)
	m.Write([]byte{0x81, 2, 3, 4, 0xaa, 0xbb, 0xcc})
	tag = m.Sum(nil)[:5]
	if string(raw[:18]) != string(token) || binary.BigEndian.Uint32(raw[18:22]) != 0x81020304 ||
		string(raw[22:25]) != "\xaa\xbb\xcc" || string(raw[25:]) != string(tag) {
		t.Fatalf("v3 value bytes %x, want token %x, time 81020304, bind aabbcc, tag %x", raw, token, tag)
	}
	// A v1 pin is the token alone.
	var pin Decoded
	ok := Decode(base64.RawURLEncoding.EncodeToString(token), &pin)
	if !ok || !pin.v1 || !s.tokens[0].Match(&pin) {
		t.Fatalf("v1 pin not read as v1: %+v %v", pin, ok)
	}
}

// FuzzDecodePin checks that no value but an issued pin verifies (token
// and tag), and that decoding garbage never panics.
func FuzzDecodePin(f *testing.F) {
	s := NewSigner([]byte("fuzz-secret"), nil, "pin", 1200, defaultStyle, []string{"127.0.0.1:9001"})
	good := s.Value(0, 5000)
	v1 := base64.RawURLEncoding.EncodeToString(s.tokens[0].token[:])
	f.Add(good)
	f.Add(v1)
	f.Add("")
	f.Add(strings.Repeat("A", ValueLen))
	f.Add(strings.Repeat("/", ValueLen))
	f.Add("\xff\xfe" + good[2:])
	f.Add(strings.Repeat("Z", 8192))
	f.Fuzz(func(t *testing.T, v string) {
		var pin Decoded
		ok := Decode(v, &pin)
		if !ok || !s.tokens[0].Match(&pin) {
			return
		}
		if pin.v1 && v != v1 {
			t.Fatalf("forged v1 value %q verifies as %q", v, v1)
		}
		want := s.V2Value(0, pin.at)
		if pin.v3 {
			want = s.BoundValue(0, pin.at, pin.bind)
		}
		if !pin.v1 && s.Verify(0, &pin) && v != want {
			t.Fatalf("forged value %q verifies as %q", v, want)
		}
	})
}

// A v3 pin's bind is signed: the same pin with another bind fails its
// tag, so that a pin cannot be moved to another session's key.
func TestPinBindIsSigned(t *testing.T) {
	s := NewSigner([]byte("s"), nil, "pin", 1200, defaultStyle, []string{"a:1", "b:1", "c:1"})
	var dp Decoded
	if !Decode(s.BoundValue(2, 1000, bindOfKey(42<<40)), &dp) || !dp.V3() || dp.Bind() != 42 {
		t.Fatalf("not a v3 pin bound to 42: %+v", dp)
	}
	if s.Index(&dp) != 2 || !s.Verify(2, &dp) {
		t.Fatal("the bound pin does not verify")
	}
	dp.bind ^= 1
	if s.Verify(2, &dp) {
		t.Fatal("a pin with another bind verifies")
	}
}

// TestPinCookieIssueAllocs: issuing a pin with every attribute is still
// a lookup of a prebuilt string.
func TestPinCookieIssueAllocs(t *testing.T) {
	style, _ := (&Attributes{Domain: "example.com", SameSite: "none", Partitioned: true, MaxAge: caddy.Duration(time.Hour)}).Style()
	s := NewSigner([]byte("s"), nil, "pin", 1200, style, []string{"a:1", "b:1"})
	now := sessions.Now()
	s.SetCookie(1, now, false, 0)
	if n := testing.AllocsPerRun(100, func() { s.SetCookie(1, now, false, 0); s.SetCookie(0, now, true, 0) }); n != 0 {
		t.Fatalf("issuing allocated %.1f times", n)
	}
}
