package redisconn

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

func TestValidate(t *testing.T) {
	for _, tc := range []struct {
		name string
		c    Config
		err  string // "" for valid
	}{
		{"single", Config{Address: "127.0.0.1:6379"}, ""},
		{"single placeholder", Config{Address: "{env.REDIS}"}, ""},
		{"sentinel", Config{SentinelMaster: "m", Sentinels: []string{"10.0.0.1:26379", "[::1]:26379"}, SentinelPassword: "s", DB: 2}, ""},
		{"cluster", Config{Cluster: []string{"10.0.0.1:6379"}, TLS: true, Timeout: caddy.Duration(time.Second)}, ""},
		{"nothing", Config{}, "need where Redis is"},
		{"two", Config{Address: "a:1", Cluster: []string{"b:1"}}, "not several"},
		{"sentinel and cluster", Config{SentinelMaster: "m", Sentinels: []string{"a:1"}, Cluster: []string{"b:1"}}, "not several"},
		{"sentinel without name", Config{Sentinels: []string{"a:1"}}, "need the master's name"},
		{"sentinel without sentinels", Config{SentinelMaster: "m"}, "at least one sentinel"},
		{"bad sentinel addr", Config{SentinelMaster: "m", Sentinels: []string{"a"}}, `sentinel: "a" is not host:port`},
		{"bad port", Config{Address: "a:http"}, `port "http" is not a number`},
		{"no host", Config{Address: ":6379"}, "lacks a host"},
		{"cluster db", Config{Cluster: []string{"a:1"}, DB: 1}, "only database 0"},
		{"sentinel_password alone", Config{Address: "a:1", SentinelPassword: "x"}, "sentinel_password is the sentinels' password"},
		{"negative db", Config{Address: "a:1", DB: -1}, "db must not be negative"},
		{"long timeout", Config{Address: "a:1", Timeout: caddy.Duration(11 * time.Second)}, "timeout must be between"},
	} {
		err := tc.c.Validate()
		switch {
		case tc.err == "" && err != nil:
			t.Errorf("%s: %v, want valid", tc.name, err)
		case tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)):
			t.Errorf("%s: error %v, want one containing %q", tc.name, err, tc.err)
		}
	}
}

// parseStore plays the store's parser: it owns the address argument and
// key_prefix, and hands every other option to UnmarshalOption.
func parseStore(input string) (*Config, string, error) {
	d := caddyfile.NewTestDispenser(input)
	d.Next() // store
	d.NextArg()
	c := &Config{}
	if d.NextArg() {
		c.Address = d.Val()
	}
	prefix := ""
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		ok, err := c.UnmarshalOption(d)
		if err != nil {
			return nil, "", err
		}
		if ok {
			continue
		}
		if d.Val() == "key_prefix" && d.NextArg() {
			prefix = d.Val()
			continue
		}
		return nil, "", d.Errf("store redis: unrecognized option %q", d.Val())
	}
	if err := c.Validate(); err != nil {
		return nil, "", d.Errf("store redis: %v", err)
	}
	return c, prefix, nil
}

func TestUnmarshalOption(t *testing.T) {
	c, prefix, err := parseStore(`store redis {
		sentinel mymaster 10.0.0.1:26379 10.0.0.2:26379
		sentinel_password {env.SENTINEL_PW}
		username app
		password secret
		db 3
		tls
		key_prefix site1
		timeout 250ms
	}`)
	if err != nil {
		t.Fatal(err)
	}
	want := Config{SentinelMaster: "mymaster", Sentinels: []string{"10.0.0.1:26379", "10.0.0.2:26379"},
		SentinelPassword: "{env.SENTINEL_PW}", Username: "app", Password: "secret", DB: 3, TLS: true,
		Timeout: caddy.Duration(250 * time.Millisecond)}
	if got, _ := json.Marshal(c); string(got) != string(must(json.Marshal(want))) || prefix != "site1" {
		t.Fatalf("parsed %s prefix %q, want %s", got, prefix, must(json.Marshal(want)))
	}
	c, _, err = parseStore("store redis {\n cluster 10.0.0.1:7000 10.0.0.2:7000\n}")
	if err != nil || c.Topology() != Cluster || len(c.Cluster) != 2 {
		t.Fatalf("cluster: %+v %v", c, err)
	}
	c, _, err = parseStore("store redis 127.0.0.1:6379")
	if err != nil || c.Topology() != Single {
		t.Fatalf("single: %+v %v", c, err)
	}
}

// Every bad line is reported with its line number.
func TestUnmarshalOptionErrorsNameTheLine(t *testing.T) {
	for _, tc := range []struct{ input, err, line string }{
		{"store redis {\n sentinel\n}", "store redis: sentinel: need the master's name", "Testfile:2"},
		{"store redis {\n\n sentinel mymaster\n}", "store redis: sentinel mymaster: need at least one sentinel", "Testfile:3"},
		{"store redis {\n sentinel m a:1\n sentinel m b:1\n}", "store redis: sentinel specified more than once", "Testfile:3"},
		{"store redis {\n cluster\n}", "store redis: cluster: need at least one node", "Testfile:2"},
		{"store redis {\n cluster a:1 b\n}", `store redis: cluster: "b" is not host:port`, "Testfile:2"},
		{"store redis {\n tls yes\n}", `store redis: tls takes no value, got "yes"`, "Testfile:2"},
		{"store redis {\n db x\n}", `store redis: db: "x" is not a whole number`, "Testfile:2"},
		{"store redis {\n timeout 1m\n}", `store redis: timeout "1m" is too long`, "Testfile:2"},
		{"store redis {\n password a b\n}", `store redis: password takes one value`, "Testfile:2"},
		{"store redis {\n username\n}", `store redis: username: need a value`, "Testfile:2"},
		{"store redis {\n bogus 1\n}", `store redis: unrecognized option "bogus"`, "Testfile:2"},
		{"store redis {\n cluster a:1\n db 2\n}", "store redis: db 2: Redis Cluster has only database 0", "Testfile:4"},
		{"store redis a:1 {\n cluster b:1\n}", "not several", "Testfile:3"},
	} {
		_, _, err := parseStore(tc.input)
		if err == nil || !strings.Contains(err.Error(), tc.err) || !strings.HasSuffix(err.Error(), ", at "+tc.line) {
			t.Errorf("%q: error %v, want one containing %q at %s", tc.input, err, tc.err, tc.line)
		}
	}
}

// Embedded without a tag, the config's fields sit beside the store's own
// in JSON, and the old single-server fields keep their names.
func TestJSONEmbedded(t *testing.T) {
	type store struct {
		Kind string `json:"kind"`
		Config
		KeyPrefix string `json:"key_prefix,omitempty"`
	}
	in := `{"kind":"redis","address":"127.0.0.1:6379","username":"u","password":"p","db":1,"tls":true,"timeout":"50ms","key_prefix":"x"}`
	var s store
	if err := json.Unmarshal([]byte(in), &s); err != nil {
		t.Fatal(err)
	}
	if s.Address != "127.0.0.1:6379" || s.DB != 1 || !s.TLS || time.Duration(s.Timeout) != 50*time.Millisecond || s.KeyPrefix != "x" {
		t.Fatalf("decoded %+v", s)
	}
	in = `{"kind":"redis","sentinel_master":"m","sentinels":["a:1","b:2"],"sentinel_password":"sp"}`
	s = store{}
	if err := json.Unmarshal([]byte(in), &s); err != nil || s.Topology() != Sentinel || len(s.Sentinels) != 2 || s.SentinelPassword != "sp" {
		t.Fatalf("decoded %+v, %v", s, err)
	}
}

// The identity tells connections apart, secrets included, without
// showing them.
func TestIdentity(t *testing.T) {
	a := Config{Address: "a:1", Password: "p1"}
	b := Config{Address: "a:1", Password: "p2"}
	if a.Identity() == b.Identity() {
		t.Fatal("two passwords, one identity")
	}
	if strings.Contains(a.Identity(), "p1") {
		t.Fatalf("identity %q shows the password", a.Identity())
	}
	c, d := Config{Cluster: []string{"a:1"}}, Config{Address: "a:1"}
	if c.Identity() == d.Identity() {
		t.Fatal("cluster and single share an identity")
	}
}

func must(b []byte, err error) []byte {
	if err != nil {
		panic(err)
	}
	return b
}
