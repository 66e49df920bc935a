package keys

import (
	"net/http"
	"strings"
)

// Session ids outside cookies. Apps that must work without cookies carry
// their session id in the URL, and some name the worker that holds the
// session in the id itself. The parsers below read those forms from the
// request path (or a Location header) without allocating; each returns a
// substring of its input.

// rawPath returns the request path as the client sent it when that
// differs from the decoded form (r.URL.RawPath), else the decoded path.
// A percent-encoded ';' or '(' is then not taken for a delimiter, as the
// app server would not take it for one either.
func rawPath(r *http.Request) string {
	if r.URL == nil {
		return ""
	}
	if r.URL.RawPath != "" {
		return r.URL.RawPath
	}
	return r.URL.Path
}

// pathParam returns the value of the first non-empty path parameter
// called name: `/shop/cart;jsessionid=0A1B2C.node1` gives "0A1B2C.node1"
// for "jsessionid". A path parameter follows a ';' in any segment and
// ends at the next ';', '/', '?' or '#'. The name is matched exactly, as
// servlet containers do.
func pathParam(path, name string) (string, bool) {
	if name == "" {
		return "", false
	}
	for {
		i := strings.IndexByte(path, ';')
		if i < 0 {
			return "", false
		}
		path = path[i+1:]
		if len(path) <= len(name) || path[len(name)] != '=' || path[:len(name)] != name {
			continue
		}
		v := path[len(name)+1:]
		end := 0
		for end < len(v) && v[end] != ';' && v[end] != '/' && v[end] != '?' && v[end] != '#' {
			end++
		}
		if end > 0 {
			return v[:end], true
		}
	}
}

// aspnetCookielessID returns the session id of an ASP.NET cookieless
// URL. ASP.NET 2.0 and later put their cookieless values in one path
// segment after the application path, each a capital letter and a value
// in parentheses, the whole in parentheses:
// `/app/(S(lit3py55t21z5v55vlm25s55))/page.aspx`, or with others beside
// it, `/(A(anon)S(lit3py55t21z5v55vlm25s55)F(t))/`. The session id is the
// S value. Mono's System.Web (and ASP.NET 1.x before it) write the bare
// id as the segment instead, `/app/(37F197D4325DAC58DC804F4A)/page.aspx`
// (see oldCookielessID). Only a segment that is entirely of one of those
// forms counts; the first one in the path wins.
func aspnetCookielessID(path string) (string, bool) {
	for path != "" {
		var seg string
		seg, path, _ = strings.Cut(path, "/")
		if len(seg) < 2 || seg[0] != '(' || seg[len(seg)-1] != ')' {
			continue
		}
		inner := seg[1 : len(seg)-1]
		if oldCookielessID(inner) {
			return inner, true
		}
		if id, ok := cookielessSegment(inner); ok {
			return id, true
		}
	}
	return "", false
}

// oldCookielessIDLen is the length of a session id in the older
// whole-segment form: Mono's SessionId.IdLength.
const oldCookielessIDLen = 24

// oldCookielessID reports whether the inside of a `(...)` path segment is
// a session id in the older form, the whole segment being the id.
//
// Mono's System.Web (mcs/class/System.Web/System.Web.SessionState_2.0/
// SessionId.cs) creates ids as 12 random bytes written by
// MachineKeySectionUtils.GetHexString: 24 characters of upper-case hex,
// 0-9 and A-F. UrlUtils.InsertSessionId puts them in the path as
// `<app path>/(<id>)/<rest>` and UrlUtils.GetSessionId reads back exactly
// a '(', 24 characters and a ')' (the same in the Mono 6.8 System.Web.dll
// Debian ships, whose redirect is `Location: /(<id>)/Default.aspx`).
// ASP.NET 1.x wrote its ids the same way, 24 characters of its own
// alphabet a-z and 0-5 (15 random bytes in base 32, the alphabet of the
// `(S(...))` ids of later versions).
//
// An id must be all of one alphabet and exactly 24 long, so that ordinary
// paths with parentheses (`/wiki/Foo_(bar)`, `/(2024)/`) are not taken
// for session ids.
func oldCookielessID(s string) bool {
	if len(s) != oldCookielessIDLen {
		return false
	}
	return allBytes(s, isUpperHex) || allBytes(s, isBase32Lower)
}

func allBytes(s string, ok func(byte) bool) bool {
	for i := 0; i < len(s); i++ {
		if !ok(s[i]) {
			return false
		}
	}
	return true
}

// isUpperHex: Mono's session id alphabet.
func isUpperHex(c byte) bool { return c >= '0' && c <= '9' || c >= 'A' && c <= 'F' }

// isBase32Lower: ASP.NET's session id alphabet, a-z then 0-5.
func isBase32Lower(c byte) bool { return c >= 'a' && c <= 'z' || c >= '0' && c <= '5' }

// cookielessSegment parses the inside of a cookieless segment, a sequence
// of `L(value)`, and returns the S value.
func cookielessSegment(s string) (string, bool) {
	id, found := "", false
	for s != "" {
		if len(s) < 3 || s[0] < 'A' || s[0] > 'Z' || s[1] != '(' {
			return "", false
		}
		end := strings.IndexByte(s[2:], ')')
		if end < 0 {
			return "", false
		}
		v := s[2 : 2+end]
		if strings.IndexByte(v, '(') >= 0 {
			return "", false
		}
		if s[0] == 'S' && !found && v != "" {
			id, found = v, true
		}
		s = s[2+end+1:]
	}
	return id, found
}

// RouteSuffix returns the worker route a session id ends in: Tomcat
// appends `.<jvmRoute>` to its session ids (`0A1B2C.node1`), as mod_jk
// and mod_proxy_balancer expect. The route is what follows the first '.';
// an id without one, or ending in it, has no route.
func RouteSuffix(id string) (string, bool) {
	i := strings.IndexByte(id, '.')
	if i < 0 || i == len(id)-1 {
		return "", false
	}
	return id[i+1:], true
}

// LocationPath returns the path of a Location header value: an absolute
// URL (`https://host/app/(S(x))/a`), a scheme-relative one (`//host/a`)
// or an absolute or relative path, without its query and fragment.
func LocationPath(loc string) string {
	if i := strings.Index(loc, "://"); i >= 0 && strings.IndexAny(loc[:i], "/?#") < 0 {
		loc = loc[i+3:]
		if j := strings.IndexAny(loc, "/?#"); j >= 0 {
			loc = loc[j:]
		} else {
			return ""
		}
	} else if strings.HasPrefix(loc, "//") {
		loc = loc[2:]
		if j := strings.IndexAny(loc, "/?#"); j >= 0 {
			loc = loc[j:]
		} else {
			return ""
		}
	}
	if j := strings.IndexAny(loc, "?#"); j >= 0 {
		loc = loc[:j]
	}
	return loc
}

// SetCookie is what the learner needs of one Set-Cookie header value.
type SetCookie struct {
	Name, Value string
	// Deleted is true for a cookie the app removes: an empty value, or
	// Max-Age zero or negative, or an Expires date in the past (the
	// epoch, as apps write it, or any year before 2000).
	Deleted bool
}

// ParseSetCookie reads the name, value and deletion of a Set-Cookie
// header value without allocating. ok is false when there is no
// `name=` before the first ';'.
func ParseSetCookie(line string) (c SetCookie, ok bool) {
	pair, attrs, _ := strings.Cut(line, ";")
	name, value, found := strings.Cut(pair, "=")
	name = strings.TrimSpace(name)
	if !found || name == "" {
		return c, false
	}
	value = strings.TrimSpace(value)
	if len(value) >= 2 && value[0] == '"' && value[len(value)-1] == '"' {
		value = value[1 : len(value)-1]
	}
	c.Name, c.Value = name, value
	c.Deleted = value == ""
	for attrs != "" {
		var a string
		a, attrs, _ = strings.Cut(attrs, ";")
		k, v, _ := strings.Cut(a, "=")
		k, v = strings.TrimSpace(k), strings.TrimSpace(v)
		switch {
		case strings.EqualFold(k, "Max-Age"):
			if v != "" && (v[0] == '-' || strings.Trim(v, "0") == "") {
				c.Deleted = true
			}
		case strings.EqualFold(k, "Expires"):
			if expiresInPast(v) {
				c.Deleted = true
			}
		}
	}
	return c, true
}

// expiresInPast reports whether an Expires attribute (`Thu, 01 Jan 1970
// 00:00:00 GMT`, or the older `Thursday, 01-Jan-70 00:00:00 GMT`) names a
// year before 2000: what apps write to delete a cookie. Later dates are
// taken for live cookies (a cookie is not a session's end because its
// date is near).
func expiresInPast(v string) bool {
	// The year is the first run of digits after the day and month.
	_, rest, ok := strings.Cut(v, " ")
	if !ok {
		return false
	}
	fields := 0
	for rest != "" && fields < 4 {
		rest = strings.TrimLeft(rest, " -")
		end := strings.IndexAny(rest, " -")
		if end < 0 {
			end = len(rest)
		}
		f := rest[:end]
		rest = rest[end:]
		fields++
		if fields == 3 { // day, month, year
			year := 0
			for i := 0; i < len(f); i++ {
				if f[i] < '0' || f[i] > '9' {
					return false
				}
				year = year*10 + int(f[i]-'0')
				if year > 9999 {
					return false
				}
			}
			switch len(f) {
			case 2:
				return year >= 70 // 70-99: 1970-1999
			case 4:
				return year < 2000
			}
			return false
		}
	}
	return false
}
