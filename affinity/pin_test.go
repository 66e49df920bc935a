package affinity

import (
	"strings"
	"testing"
)

func TestPinTokenRoundTrip(t *testing.T) {
	a := newPinToken([]byte("s"), "10.0.0.1:80", "pin")
	b := newPinToken([]byte("s"), "10.0.0.2:80", "pin")
	c := newPinToken([]byte("other"), "10.0.0.1:80", "pin")
	if len(a.value) != pinValueLen {
		t.Fatalf("pin value %q has length %d", a.value, len(a.value))
	}
	if a.value == b.value || a.value == c.value {
		t.Fatal("pins do not depend on upstream and secret")
	}
	if again := newPinToken([]byte("s"), "10.0.0.1:80", "pin"); again.value != a.value {
		t.Fatal("pin is not deterministic: instances would disagree")
	}
	if strings.Contains(a.value, "10.0.0.1") {
		t.Fatal("pin names the address")
	}
	id, mac, ok := decodePin(a.value)
	if !ok || !a.match(id, &mac) || b.match(id, &mac) || c.match(id, &mac) {
		t.Fatal("pin does not verify against exactly its own token")
	}
}

// FuzzDecodePin checks that no value but the exact token verifies, and
// that decoding garbage never panics.
func FuzzDecodePin(f *testing.F) {
	tok := newPinToken([]byte("fuzz-secret"), "127.0.0.1:9001", "pin")
	f.Add(tok.value)
	f.Add("")
	f.Add(strings.Repeat("A", pinValueLen))
	f.Add(strings.Repeat("/", pinValueLen))
	f.Add("\xff\xfe" + tok.value[2:])
	f.Add(strings.Repeat("Z", 8192))
	f.Fuzz(func(t *testing.T, v string) {
		id, mac, ok := decodePin(v)
		if ok && tok.match(id, &mac) && v != tok.value {
			t.Fatalf("forged value %q verifies as %q", v, tok.value)
		}
	})
}
