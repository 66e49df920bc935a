package keys

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"golang.org/x/net/http/httpguts"
)

func TestPathParam(t *testing.T) {
	for _, tc := range []struct{ path, name, want string }{
		{"/shop/cart;jsessionid=0A1B2C.node1", "jsessionid", "0A1B2C.node1"},
		{"/a;jsessionid=X/b", "jsessionid", "X"},
		{"/a;foo=1;jsessionid=Y", "jsessionid", "Y"},
		{"/a;jsessionid=Y;foo=1", "jsessionid", "Y"},
		{"/a;jsessionid=;jsessionid=Z", "jsessionid", "Z"},
		{"/a;jsessionid=Q?x=1", "jsessionid", "Q"},
		{"/a;jsessionid=Q#frag", "jsessionid", "Q"},
		{"/a;jsessionid=", "jsessionid", ""},
		{"/a;JSESSIONID=X", "jsessionid", ""},
		{"/a;jsessionidx=1", "jsessionid", ""},
		{"/a;xjsessionid=1", "jsessionid", ""},
		{"/a/jsessionid=1", "jsessionid", ""},
		{"/a%3Bjsessionid=1", "jsessionid", ""},
		{"", "jsessionid", ""},
		{"/a;=1", "", ""},
		{";sid=v", "sid", "v"},
	} {
		got, ok := pathParam(tc.path, tc.name)
		if got != tc.want || ok != (tc.want != "") {
			t.Errorf("pathParam(%q, %q) = %q, %v; want %q", tc.path, tc.name, got, ok, tc.want)
		}
	}
}

func TestAspnetCookielessID(t *testing.T) {
	for _, tc := range []struct{ path, want string }{
		{"/(S(lit3py55t21z5v55vlm25s55))/default.aspx", "lit3py55t21z5v55vlm25s55"},
		{"/app/(S(abc))/x.aspx", "abc"},
		{"/(A(anon-1)S(sid1)F(ticket))/x", "sid1"},
		{"/(S(abc))", "abc"},
		{"/app/sub/(X(1)S(z))/a/b", "z"},
		{"/(X(1))/x", ""},
		{"/(S())/x", ""},
		{"/(S(abc)/x", ""},
		{"/(S(a(b)))/x", ""},
		{"/x(S(abc))/y", ""},
		{"/(s(abc))/y", ""},
		{"/(S(abc))x/y", ""},
		{"/(S(abc)junk)/y", ""},
		{"/%28S%28abc%29%29/y", ""},
		{"/()/y", ""},
		{"", ""},
		{"/(S(first))/(S(second))/", "first"},
		{"/(bad)/(S(next))/", "next"},

		// The older whole-segment form of Mono's System.Web: 24 upper-case
		// hex digits (Mono's SessionId), and of ASP.NET 1.x: 24 of a-z0-5.
		{"/app/(37F197D4325DAC58DC804F4A)/Default.aspx", "37F197D4325DAC58DC804F4A"},
		{"/(37F197D4325DAC58DC804F4A)/", "37F197D4325DAC58DC804F4A"},
		{"/(37F197D4325DAC58DC804F4A)", "37F197D4325DAC58DC804F4A"},
		{"(37F197D4325DAC58DC804F4A)/x", "37F197D4325DAC58DC804F4A"},
		{"/a/b/(000000000000000000000000)/c", "000000000000000000000000"},
		{"/(lit3py55t21z5v55vlm25s55)/orderform.aspx", "lit3py55t21z5v55vlm25s55"},
		{"/wiki/Foo_(bar)/(37F197D4325DAC58DC804F4A)/x", "37F197D4325DAC58DC804F4A"},
		{"/(37F197D4325DAC58DC804F4A)/(S(later))/", "37F197D4325DAC58DC804F4A"},
		{"/(S(first))/(37F197D4325DAC58DC804F4A)/", "first"},
		// Near misses: ordinary paths with parentheses, and ids one
		// character off in length, alphabet or delimiters.
		{"/wiki/Foo_(bar)", ""},
		{"/wiki/Foo_(bar)/baz", ""},
		{"/(2024)/report", ""},
		{"/(37F197D4325DAC58DC804F4)/x", ""},   // 23
		{"/(37F197D4325DAC58DC804F4AB)/x", ""}, // 25
		{"/(37f197d4325dac58dc804f4a)/x", ""},  // lower-case hex: Mono writes upper case
		{"/(37F197D4325DAC58DC804F4G)/x", ""},  // G is not hex
		{"/(lit3py55t21z5v55vlm25s56)/x", ""},  // 6 is not in a-z0-5
		{"/(37F197D4325DAC58dc804f4a)/x", ""},  // alphabets mixed
		{"/(ABCDEFabcdefABCDEFabcdef)/x", ""},  // alphabets mixed
		{"/( 37F197D4325DAC58DC804F4)/x", ""},
		{"/x(37F197D4325DAC58DC804F4A)/y", ""},
		{"/(37F197D4325DAC58DC804F4A)x/y", ""},
		{"/((37F197D4325DAC58DC804F4A))/y", ""},
		{"/(37F197D4325DAC58DC804F4A/y", ""},
		{"/37F197D4325DAC58DC804F4A)/y", ""},
		{"/%2837F197D4325DAC58DC804F4A%29/y", ""},
		{"/(37F197D4325D/AC58DC804F4A)/y", ""},
		{"/a;(37F197D4325DAC58DC804F4A)/y", ""},
	} {
		got, ok := aspnetCookielessID(tc.path)
		if got != tc.want || ok != (tc.want != "") {
			t.Errorf("aspnetCookielessID(%q) = %q, %v; want %q", tc.path, got, ok, tc.want)
		}
	}
}

func TestRouteSuffix(t *testing.T) {
	for _, tc := range []struct{ id, want string }{
		{"0A1B2C3D.node1", "node1"},
		{"ABC.a.b", "a.b"},
		{".r", "r"},
		{"ABC", ""},
		{"ABC.", ""},
		{"", ""},
	} {
		got, ok := RouteSuffix(tc.id)
		if got != tc.want || ok != (tc.want != "") {
			t.Errorf("RouteSuffix(%q) = %q, %v; want %q", tc.id, got, ok, tc.want)
		}
	}
}

func TestLocationPath(t *testing.T) {
	for _, tc := range []struct{ loc, want string }{
		{"https://example.com/app/(S(x))/a.aspx?q=1#f", "/app/(S(x))/a.aspx"},
		{"http://example.com:8080/a;jsessionid=1", "/a;jsessionid=1"},
		{"//example.com/a;jsessionid=2?x", "/a;jsessionid=2"},
		{"/a?x", "/a"},
		{"relative/page;jsessionid=3", "relative/page;jsessionid=3"},
		{"https://example.com", ""},
		{"https://example.com?x=/a", ""},
		{"/redirect?to=https://other/a;jsessionid=9", "/redirect"},
		{"", ""},
	} {
		if got := LocationPath(tc.loc); got != tc.want {
			t.Errorf("LocationPath(%q) = %q, want %q", tc.loc, got, tc.want)
		}
	}
}

func TestParseSetCookie(t *testing.T) {
	for _, tc := range []struct {
		line, name, value string
		deleted, ok       bool
	}{
		{"sid=abc; Path=/; HttpOnly", "sid", "abc", false, true},
		{"sid=abc", "sid", "abc", false, true},
		{` sid = "quoted" ; Secure`, "sid", "quoted", false, true},
		{"sid=; Path=/", "sid", "", true, true},
		{"sid=x; Max-Age=0", "sid", "x", true, true},
		{"sid=x; max-age=-1", "sid", "x", true, true},
		{"sid=x; Max-Age=00", "sid", "x", true, true},
		{"sid=x;Max-Age=3600", "sid", "x", false, true},
		{"PHPSESSID=deleted; expires=Thu, 01-Jan-1970 00:00:01 GMT; Max-Age=0; path=/", "PHPSESSID", "deleted", true, true},
		{"sid=x; Expires=Thu, 01 Jan 1970 00:00:00 GMT", "sid", "x", true, true},
		{"sid=x; Expires=Wed, 21 Oct 2099 07:28:00 GMT; Path=/", "sid", "x", false, true},
		{"sid=x; Expires=garbage", "sid", "x", false, true},
		{"sid=a=b; Path=/", "sid", "a=b", false, true},
		{"=x", "", "", false, false},
		{"novalue", "", "", false, false},
		{"", "", "", false, false},
	} {
		c, ok := ParseSetCookie(tc.line)
		if ok != tc.ok || (ok && (c.Name != tc.name || c.Value != tc.value || c.Deleted != tc.deleted)) {
			t.Errorf("ParseSetCookie(%q) = %+v, %v; want %q %q deleted=%v ok=%v", tc.line, c, ok, tc.name, tc.value, tc.deleted, tc.ok)
		}
	}
}

func TestSessionIDKeys(t *testing.T) {
	keys := []Source{
		{From: "cookie", Name: "JSESSIONID"},
		{From: "path_param", Name: "jsessionid"},
		{From: "aspnet_cookieless"},
	}
	for i := range keys {
		if err := keys[i].Provision(); err != nil {
			t.Fatal(err)
		}
	}
	byCookie := cookieRequest("JSESSIONID=0A1B.node1")
	byPath := httptest.NewRequest(http.MethodGet, "http://example.com/shop;jsessionid=0A1B.node1?x=1", nil)
	cookieless := httptest.NewRequest(http.MethodGet, "http://example.com/app/(S(0A1B.node1))/page.aspx", nil)
	hc, ok1 := keys[0].Hash(byCookie)
	hp, ok2 := keys[1].Hash(byPath)
	ha, ok3 := keys[2].Hash(cookieless)
	if !ok1 || !ok2 || !ok3 {
		t.Fatalf("keys not found: %v %v %v", ok1, ok2, ok3)
	}
	// One session id is one key wherever the request carries it.
	if hc != hp || hc != ha || hc != sessionIDHash("0A1B.node1") {
		t.Fatalf("the same session id hashed differently: cookie %x, path %x, cookieless %x", hc, hp, ha)
	}
	// The older whole-segment form too: `(X)` and ASP.NET_SessionId=X.
	aspCookie := Source{From: "cookie", Name: "ASP.NET_SessionId"}
	if err := aspCookie.Provision(); err != nil {
		t.Fatal(err)
	}
	const monoID = "37F197D4325DAC58DC804F4A"
	hm, okm := keys[2].Hash(httptest.NewRequest(http.MethodGet, "http://example.com/app/("+monoID+")/Default.aspx", nil))
	hmc, okc := aspCookie.Hash(cookieRequest("ASP.NET_SessionId=" + monoID))
	if !okm || !okc || hm != hmc || hm != sessionIDHash(monoID) {
		t.Fatalf("Mono's cookieless id and its cookie: %x %v, %x %v", hm, okm, hmc, okc)
	}
	if _, ok := keys[1].Hash(byCookie); ok {
		t.Error("path_param key found in a request without the parameter")
	}
	for _, bad := range []Source{{From: "path_param"}, {From: "path_param", Name: "a/b"}, {From: "aspnet_cookieless", Name: "x"}} {
		if err := bad.Provision(); err == nil {
			t.Errorf("%+v provisioned", bad)
		}
	}
}

func TestSessionIDParsersDoNotAllocate(t *testing.T) {
	path := "/app/(A(anon)S(lit3py55t21z5v55vlm25s55))/x;jsessionid=0A1B.node1"
	mono := "/wiki/Foo_(bar)/(37F197D4325DAC58DC804F4A)/Default.aspx"
	allocs := testing.AllocsPerRun(100, func() {
		if _, ok := aspnetCookielessID(mono); !ok {
			t.Fatal("no old-form cookieless id")
		}
		if _, ok := pathParam(path, "jsessionid"); !ok {
			t.Fatal("no path param")
		}
		if _, ok := aspnetCookielessID(path); !ok {
			t.Fatal("no cookieless id")
		}
		if _, ok := RouteSuffix("0A1B.node1"); !ok {
			t.Fatal("no route")
		}
		if _, ok := ParseSetCookie("sid=x; Expires=Thu, 01 Jan 1970 00:00:00 GMT; Path=/"); !ok {
			t.Fatal("no cookie")
		}
		_ = LocationPath("https://example.com" + "/a;jsessionid=1")
	})
	if allocs != 0 {
		t.Fatalf("parsers allocated %.1f times", allocs)
	}
}

// FuzzPathParam: never panics; a found value is non-empty, free of
// delimiters and really follows `;name=` in the path; a parameter put in a
// path is found.
func FuzzPathParam(f *testing.F) {
	for _, s := range [][3]string{
		{"/shop/cart", "jsessionid", "0A1B2C.node1"},
		{"/a;x=1", "jsessionid", "v"},
		{"", "sid", "1"},
		{"/a;jsessionid=/b", "jsessionid", "z"},
	} {
		f.Add(s[0], s[1], s[2])
	}
	f.Fuzz(func(t *testing.T, path, name, id string) {
		if v, ok := pathParam(path, name); ok {
			if v == "" || strings.ContainsAny(v, ";/?#") || !strings.Contains(path, ";"+name+"="+v) {
				t.Fatalf("pathParam(%q, %q) = %q", path, name, v)
			}
		}
		if name == "" || id == "" || strings.ContainsAny(id, ";/?#") || strings.ContainsAny(name, ";/?#=") || strings.Contains(path, ";") {
			return
		}
		if v, ok := pathParam(path+";"+name+"="+id+"/rest", name); !ok || v != id {
			t.Fatalf("pathParam of %q with %s=%q appended: %q, %v", path, name, id, v, ok)
		}
	})
}

// FuzzAspnetCookielessID: never panics; a found id is a non-empty S value
// of the path, or a whole `(<id>)` segment of 24 characters of one of the
// older forms' alphabets; an id put in a cookieless segment of either
// form is found.
func FuzzAspnetCookielessID(f *testing.F) {
	for _, s := range [][2]string{
		{"/app/(S(lit3py55t21z5v55vlm25s55))/default.aspx", "abc"},
		{"/(A(x)S(y)F(z))/", "q"},
		{"/(S(", "id"},
		{"/((()))", ")"},
		{"/app/(37F197D4325DAC58DC804F4A)/Default.aspx", "37F197D4325DAC58DC804F4A"},
		{"/wiki/Foo_(bar)", "lit3py55t21z5v55vlm25s55"},
		{"/(37F197D4325DAC58DC804F4)/", "37f197d4325dac58dc804f4a"},
	} {
		f.Add(s[0], s[1])
	}
	f.Fuzz(func(t *testing.T, path, id string) {
		if v, ok := aspnetCookielessID(path); ok {
			old := len(v) == oldCookielessIDLen && oldCookielessID(v) && segmentOf(path, "("+v+")")
			if v == "" || strings.ContainsAny(v, "()/") || (!old && !strings.Contains(path, "S("+v+")")) {
				t.Fatalf("aspnetCookielessID(%q) = %q", path, v)
			}
		}
		if id == "" || strings.ContainsAny(id, "()/") {
			return
		}
		rest := "/" + strings.ReplaceAll(path, "(", "")
		if v, ok := aspnetCookielessID("/app/(A(anon)S(" + id + "))" + rest); !ok || v != id {
			t.Fatalf("cookieless id %q not found: %q, %v", id, v, ok)
		}
		if v, ok := aspnetCookielessID("/app/(" + id + ")" + rest); ok != oldCookielessID(id) || (ok && v != id) {
			t.Fatalf("old-form cookieless id %q: %q, %v", id, v, ok)
		}
	})
}

// segmentOf reports whether seg is a whole '/'-separated segment of path.
func segmentOf(path, seg string) bool {
	for _, s := range strings.Split(path, "/") {
		if s == seg {
			return true
		}
	}
	return false
}

// FuzzRouteSuffix: a route is the non-empty rest after the first dot.
func FuzzRouteSuffix(f *testing.F) {
	for _, s := range []string{"0A1B.node1", "x", ".", "a.b.c", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, id string) {
		route, ok := RouteSuffix(id)
		i := strings.IndexByte(id, '.')
		if ok != (i >= 0 && i < len(id)-1) || (ok && route != id[i+1:]) {
			t.Fatalf("RouteSuffix(%q) = %q, %v", id, route, ok)
		}
	})
}

// FuzzParseSetCookie: never panics; what it returns comes from the line,
// and a cookie it writes itself is read back.
func FuzzParseSetCookie(f *testing.F) {
	for _, s := range []string{
		"sid=abc; Path=/; HttpOnly",
		"PHPSESSID=deleted; expires=Thu, 01-Jan-1970 00:00:01 GMT; Max-Age=0",
		`a="b"; Max-Age=-5`,
		"x=; Expires=Thu, 01 Jan 1970 00:00:00 GMT",
		";;=;",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, line string) {
		c, ok := ParseSetCookie(line)
		if !ok {
			return
		}
		if c.Name == "" || strings.Contains(c.Name, ";") || strings.Contains(c.Value, ";") ||
			!strings.Contains(line, c.Name) || !strings.Contains(line, c.Value) {
			t.Fatalf("ParseSetCookie(%q) = %+v", line, c)
		}
		if c.Value == "" && !c.Deleted {
			t.Fatalf("ParseSetCookie(%q): empty value not taken for a deletion", line)
		}
		if !httpguts.ValidHeaderFieldName(c.Name) || strings.ContainsAny(c.Value, " \t\";\\,") || c.Value == "" {
			return
		}
		back := (&http.Cookie{Name: c.Name, Value: c.Value, Path: "/", HttpOnly: true}).String()
		if !strings.HasPrefix(back, c.Name+"="+c.Value+";") {
			return // net/http would not send that value as it is
		}
		if b, ok := ParseSetCookie(back); !ok || b.Name != c.Name || b.Value != c.Value || b.Deleted {
			t.Fatalf("round trip of %q: %+v, %v", back, b, ok)
		}
	})
}
