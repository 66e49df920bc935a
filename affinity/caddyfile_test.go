package affinity

import (
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"

	"github.com/caddy-affinity/caddy-affinity/affinity/keys"
)

func parse(input string) (*Policy, error) {
	p := new(Policy)
	err := p.UnmarshalCaddyfile(caddyfile.NewTestDispenser(input))
	return p, err
}

func TestUnmarshalCaddyfile(t *testing.T) {
	p, err := parse(`affinity {
		key cookie ASP.NET_SessionId
		key header X-Session
		key query sid
		key client_ip 24 48
		pin_cookie lbpin
		secret {env.AFFINITY_SECRET}
		session_ttl 30m
		max_sessions 5000
		weights 3 2 1
	}`)
	if err != nil {
		t.Fatal(err)
	}
	want := &Policy{
		Keys: []keys.Source{
			{From: "cookie", Name: "ASP.NET_SessionId"},
			{From: "header", Name: "X-Session"},
			{From: "query", Name: "sid"},
			{From: "client_ip", IPv4Bits: 24, IPv6Bits: 48},
		},
		PinCookie:   "lbpin",
		Secret:      "{env.AFFINITY_SECRET}",
		SessionTTL:  caddy.Duration(30 * time.Minute),
		MaxSessions: 5000,
		Weights:     []int{3, 2, 1},
	}
	if !reflect.DeepEqual(p, want) {
		t.Fatalf("got %+v\nwant %+v", p, want)
	}

	p, err = parse("affinity {\n pin_cookie off\n key client_ip\n}")
	if err != nil || !p.DisablePinCookie || p.Keys[0].IPv4Bits != 0 {
		t.Fatalf("pin_cookie off: %+v, %v", p, err)
	}
	if _, err := parse("affinity"); err != nil {
		t.Fatalf("bare affinity: %v", err)
	}
}

func TestUnmarshalCaddyfileErrors(t *testing.T) {
	for _, tc := range []struct{ input, want string }{
		{"affinity extra", "takes no arguments"},
		{"affinity {\n bogus 1\n}", `unrecognized affinity option "bogus"`},
		{"affinity {\n key\n}", "key: need a source"},
		{"affinity {\n key cookie\n}", "key cookie: need exactly one name"},
		{"affinity {\n key cookie a b\n}", "key cookie: need exactly one name"},
		{"affinity {\n key jwt sub\n}", `unknown source "jwt"`},
		{"affinity {\n scope\n}", "scope: need a value"},
		{"affinity {\n session_ttl 400d\n}", "session_ttl: 9600h0m0s is not between 1s and 8760h0m0s"},
		{"affinity {\n hold 2h\n}", "hold: 2h0m0s is not between 0 and 1h0m0s"},
		{"affinity {\n slow_start 25h\n}", "slow_start: 25h0m0s is not between 0 and 24h0m0s"},
		{"affinity {\n max_sessions 100\n}", "max_sessions: 100 is not between 256"},
		{"affinity {\n key cookie caddy_affinity\n}", "key cookie caddy_affinity: reads the pin cookie caddy_affinity"},
		{"affinity {\n key cookie sid\n pin_cookie sid\n}", "key cookie sid: reads the pin cookie sid"},
		{"affinity {\n scope a b\n}", "scope: takes one value"},
		{"affinity {\n scope a\n scope b\n}", "scope specified more than once"},
		{"affinity {\n key client_ip 33\n}", `prefix length "33" is not in 1..32`},
		{"affinity {\n key client_ip 24 129\n}", `prefix length "129" is not in 1..128`},
		{"affinity {\n key client_ip 1 2 3\n}", "at most two prefix lengths"},
		{"affinity {\n key client_ip x\n}", `"x"`},
		{"affinity {\n key cookie a;b\n}", "has a space"},
		{"affinity {\n pin_cookie\n}", "pin_cookie: need a value"},
		{"affinity {\n pin_cookie a b\n}", "takes one value"},
		{"affinity {\n pin_cookie a=b\n}", "not a valid cookie name"},
		{"affinity {\n session_ttl soon\n}", `session_ttl: invalid duration "soon"`},
		{"affinity {\n session_ttl 10ms\n}", "is not between 1s"},
		{"affinity {\n pin_cookie JSESSIONID\n}", "pin_cookie JSESSIONID: the default keys (platform_cookies) read that cookie"},
		{"affinity {\n key none\n pin_cookie off\n}", "pin_cookie off with key none"},
		{"affinity {\n max_sessions 99999999999999\n}", "max_sessions: 99999999999999 is not between"},
		{"affinity {\n key cookie a\n balance_factor 1e308\n}", "balance_factor: 1e+308 is not more than 1 and at most 100"},
		{"affinity {\n max_sessions -5\n}", `max_sessions: "-5" is not a positive`},
		{"affinity {\n weights\n}", "weights: need one weight per upstream"},
		{"affinity {\n weights 1 -2\n}", "weights: weight -2 (upstream 2) is negative"},
		{"affinity {\n secret a\n secret b\n}", "secret specified more than once"},
	} {
		_, err := parse(tc.input)
		if err == nil {
			t.Errorf("%q: no error", tc.input)
			continue
		}
		if !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: error %q does not say %q", tc.input, err, tc.want)
		}
		if !strings.Contains(err.Error(), "Testfile:") {
			t.Errorf("%q: error %q names no line", tc.input, err)
		}
	}
}

func TestValidate(t *testing.T) {
	for _, tc := range []struct {
		p    *Policy
		want string
	}{
		{&Policy{DisablePinCookie: true, NoDefaultKeys: true, PinCookie: "x", SessionTTL: caddy.Duration(time.Minute)}, "nothing would tell sessions apart"},
		{&Policy{PinCookie: "x y", SessionTTL: caddy.Duration(time.Minute)}, "not a valid cookie name"},
		{&Policy{PinCookie: "x", SessionTTL: caddy.Duration(time.Minute), Weights: []int{1, -1}}, "negative"},
	} {
		if err := tc.p.Validate(); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: error %v, want %q", tc.p.Keys, err, tc.want)
		}
	}
}

// FuzzUnmarshalCaddyfile feeds arbitrary blocks to the parser: it never
// panics, and a block it accepts provisions its keys without error.
func FuzzUnmarshalCaddyfile(f *testing.F) {
	for _, s := range []string{
		"affinity",
		"affinity {\n key cookie sid\n key client_ip 24\n}",
		"affinity {\n pin_cookie off\n key header X\n}",
		"affinity {\n weights 1 0 3\n session_ttl 1h\n max_sessions 10\n}",
		"affinity {\n secret {env.X}\n}",
		"affinity {\n key client_ip 0 0\n}",
		"affinity {\n key\n}",
		"affinity { key cookie }",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, input string) {
		p, err := parse(input)
		if err != nil {
			return
		}
		for i := range p.Keys {
			if err := p.Keys[i].Provision(); err != nil {
				t.Fatalf("accepted %q but key %d does not provision: %v", input, i, err)
			}
		}
	})
}
