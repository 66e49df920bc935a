package tests

import (
	"bufio"
	"crypto/rand"
	"crypto/sha1"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/websocket"
)

// A session that starts with a WebSocket: the app answers the upgrade
// (101 Switching Protocols) with its session cookie, as apps that open a
// socket before any page view do (a chat widget, a live dashboard). The
// 101 is the session's first response, so it is where the pin cookie must
// be issued and where affinity_learn must learn the app's id; the plain
// HTTP requests that follow must reach the process holding the session.
//
// The backends speak real WebSocket (golang.org/x/net/websocket, already
// a dependency); the client does the RFC 6455 handshake by hand over a
// net.Conn, because it must read the 101's headers, which no WebSocket
// client library hands back.

// wsCookie is the backends' session cookie.
const wsCookie = "sid"

// wsBackend is one WebSocket app process: it creates a session (an id in
// its memory) on every upgrade without one, and answers plain GET / with
// its name and whether it knows the request's session.
type wsBackend struct {
	name string
	addr string
	srv  *http.Server

	mu       sync.Mutex
	sessions map[string]bool
}

func startWSBackends(t *testing.T, n int) []*wsBackend {
	t.Helper()
	bs := make([]*wsBackend, n)
	for i := range bs {
		b := &wsBackend{name: string(rune('A' + i)), sessions: map[string]bool{}}
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		b.addr = ln.Addr().String()
		mux := http.NewServeMux()
		mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "ok") })
		mux.Handle("/ws", websocket.Server{
			// The handshake creates the session and sets its cookie on
			// the 101 (x/net/websocket writes Config.Header there). No
			// origin check: the test's client is not a browser.
			Handshake: func(cfg *websocket.Config, r *http.Request) error {
				if c, err := r.Cookie(wsCookie); err == nil && b.knows(c.Value) {
					return nil
				}
				id := randomHex(16)
				b.mu.Lock()
				b.sessions[id] = true
				b.mu.Unlock()
				cfg.Header = http.Header{"Set-Cookie": {wsCookie + "=" + id + "; Path=/; HttpOnly"}}
				return nil
			},
			// One echo per message, prefixed with the process's name.
			Handler: func(ws *websocket.Conn) {
				for {
					var msg string
					if err := websocket.Message.Receive(ws, &msg); err != nil {
						return
					}
					if err := websocket.Message.Send(ws, b.name+":"+msg); err != nil {
						return
					}
				}
			},
		})
		mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
			known := false
			if c, err := r.Cookie(wsCookie); err == nil {
				known = b.knows(c.Value)
			}
			fmt.Fprintf(w, "%s %v", b.name, known)
		})
		b.srv = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
		go b.srv.Serve(ln)
		t.Cleanup(func() { b.srv.Close() })
		bs[i] = b
	}
	return bs
}

func (b *wsBackend) knows(id string) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.sessions[id]
}

func wsAddrs(bs []*wsBackend) []string {
	out := make([]string, len(bs))
	for i, b := range bs {
		out[i] = b.addr
	}
	return out
}

func randomHex(n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b)
}

// wsResult is one WebSocket session opened through the proxy: the 101's
// cookies and the echo of one message.
type wsResult struct {
	cookies map[string]string // Set-Cookie of the 101, name -> value
	echo    string            // "<backend>:<message>"
}

// wsOpen does the RFC 6455 client handshake on base's /ws with the given
// Cookie header (none if empty), checks the 101, sends one masked text
// frame and reads the echo.
func wsOpen(base, cookie string) (wsResult, error) {
	var res wsResult
	host := strings.TrimPrefix(base, "http://")
	conn, err := net.DialTimeout("tcp", host, 5*time.Second)
	if err != nil {
		return res, err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))

	key := base64.StdEncoding.EncodeToString([]byte(randomHex(8)))
	req, err := http.NewRequest(http.MethodGet, base+"/ws", nil)
	if err != nil {
		return res, err
	}
	req.Header.Set("Upgrade", "websocket")
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Sec-WebSocket-Key", key)
	req.Header.Set("Sec-WebSocket-Version", "13")
	req.Header.Set("Origin", base)
	if cookie != "" {
		req.Header.Set("Cookie", cookie)
	}
	if err := req.Write(conn); err != nil {
		return res, err
	}
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, req)
	if err != nil {
		return res, fmt.Errorf("reading the handshake's answer: %w", err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return res, fmt.Errorf("handshake answered %s: %s", resp.Status, body)
	}
	sum := sha1.Sum([]byte(key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"))
	if got, want := resp.Header.Get("Sec-WebSocket-Accept"), base64.StdEncoding.EncodeToString(sum[:]); got != want {
		return res, fmt.Errorf("Sec-WebSocket-Accept %q, want %q", got, want)
	}
	res.cookies = map[string]string{}
	for _, c := range resp.Cookies() {
		res.cookies[c.Name] = c.Value
	}

	// One text frame, FIN set, masked as a client must (payload < 126).
	msg := []byte("hello " + randomHex(4))
	mask := []byte(randomHex(2))
	frame := append([]byte{0x81, 0x80 | byte(len(msg))}, mask...)
	for i, c := range msg {
		frame = append(frame, c^mask[i%4])
	}
	if _, err := conn.Write(frame); err != nil {
		return res, err
	}
	// The echo: a server frame is unmasked.
	var hdr [2]byte
	if _, err := io.ReadFull(br, hdr[:]); err != nil {
		return res, fmt.Errorf("reading the echo: %w", err)
	}
	if hdr[0] != 0x81 || hdr[1]&0x80 != 0 || hdr[1]&0x7f >= 126 {
		return res, fmt.Errorf("unexpected frame header % x", hdr)
	}
	payload := make([]byte, hdr[1]&0x7f)
	if _, err := io.ReadFull(br, payload); err != nil {
		return res, fmt.Errorf("reading the echo: %w", err)
	}
	res.echo = string(payload)
	if !strings.HasSuffix(res.echo, ":"+string(msg)) {
		return res, fmt.Errorf("echo %q of %q", res.echo, msg)
	}
	return res, nil
}

// backend returns the name of the process that echoed.
func (r wsResult) backend() string {
	name, _, _ := strings.Cut(r.echo, ":")
	return name
}

// wsPlainGet does GET / with only the given Cookie header and returns the
// backend's answer ("<name> <knows the session>").
func wsPlainGet(base, cookie string) (string, error) {
	req, err := http.NewRequest(http.MethodGet, base+"/", nil)
	if err != nil {
		return "", err
	}
	req.Header.Set("Cookie", cookie)
	hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{Proxy: nil, DisableKeepAlives: true}}
	resp, err := hc.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 512))
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusOK {
		return "", errors.New(resp.Status + ": " + string(body))
	}
	return string(body), nil
}

// wsSessions is how many WebSocket sessions each run opens: with three
// backends, the ring would place all of them on the process that created
// them once in 3^12 runs, so the control run shows the learner matters.
const wsSessions = 12

// TestWebSocketUpgradePinAndLearn: the 101 of a new session carries the
// pin cookie and the WebSocket works through it; with pin_cookie off and
// affinity_learn, the app's id set on the 101 is learned, so a later
// plain request carrying only that id reaches the process that created
// the session. The control run (no learner) sends some of them elsewhere.
func TestWebSocketUpgradePinAndLearn(t *testing.T) {
	needCaddy(t)
	bs := startWSBackends(t, 3)
	names := map[string]*wsBackend{}
	for _, b := range bs {
		names[b.name] = b
	}

	t.Run("pin cookie on the 101", func(t *testing.T) {
		p := startCaddySite(t, "ws-pin", learnSite(wsAddrs(bs), "affinity_learn", "key cookie "+wsCookie))
		for range 3 {
			r, err := wsOpen(p.URL, "")
			if err != nil {
				t.Fatalf("WebSocket through Caddy: %v", err)
			}
			if r.cookies[pinCookie] == "" || r.cookies[wsCookie] == "" {
				t.Fatalf("the 101 of a new session sets %v, want the pin (%s) and the app's %s", r.cookies, pinCookie, wsCookie)
			}
			// The cookies of the 101 take the session's next request (and its
			// next socket) to the process that holds it.
			got, err := wsPlainGet(p.URL, pinCookie+"="+r.cookies[pinCookie]+"; "+wsCookie+"="+r.cookies[wsCookie])
			if err != nil || got != r.backend()+" true" {
				t.Errorf("after a socket on %s, GET / with its cookies reached %q (%v)", r.backend(), got, err)
			}
			again, err := wsOpen(p.URL, pinCookie+"="+r.cookies[pinCookie]+"; "+wsCookie+"="+r.cookies[wsCookie])
			if err != nil || again.backend() != r.backend() {
				t.Errorf("a second socket of the session went to %q, want %s (%v)", again.backend(), r.backend(), err)
			} else if _, reissued := again.cookies[pinCookie]; reissued {
				t.Errorf("the 101 of a pinned session re-issued the pin: %v", again.cookies)
			}
			t.Logf("socket on %s: 101 set %s and %s; echo %q", r.backend(), pinCookie, wsCookie, r.echo)
		}
	})

	// run opens wsSessions sockets with no cookie, then sends a plain
	// request with only each socket's app id, and counts the requests that
	// reached the process holding the session.
	run := func(t *testing.T, name, siteLines string) (kept int, perBackend map[string]int) {
		p := startCaddySite(t, name, learnSite(wsAddrs(bs), siteLines, "key cookie "+wsCookie+"\npin_cookie off"))
		perBackend = map[string]int{}
		for range wsSessions {
			r, err := wsOpen(p.URL, "")
			if err != nil {
				t.Fatalf("WebSocket through Caddy: %v", err)
			}
			if _, pinned := r.cookies[pinCookie]; pinned {
				t.Errorf("pin_cookie off, yet the 101 set %s", pinCookie)
			}
			id := r.cookies[wsCookie]
			if id == "" || !names[r.backend()].knows(id) {
				t.Fatalf("the 101 set %v; echo %q", r.cookies, r.echo)
			}
			perBackend[r.backend()]++
			got, err := wsPlainGet(p.URL, wsCookie+"="+id)
			if err != nil {
				t.Fatalf("GET / with %s: %v", wsCookie, err)
			}
			if got == r.backend()+" true" {
				kept++
			}
		}
		return kept, perBackend
	}

	t.Run("learned from the 101", func(t *testing.T) {
		kept, per := run(t, "ws-learn", "affinity_learn")
		t.Logf("affinity_learn, pin_cookie off: %d of %d sessions started by a socket kept by their id alone; sockets per backend %v", kept, wsSessions, sortedMap(per))
		if kept != wsSessions {
			t.Errorf("%d of %d plain requests with the id set on a 101 reached the process holding it", kept, wsSessions)
		}
	})
	t.Run("control: no learner", func(t *testing.T) {
		kept, per := run(t, "ws-nolearn", "")
		t.Logf("no learner, pin_cookie off: %d of %d kept; sockets per backend %v", kept, wsSessions, sortedMap(per))
		if kept == wsSessions {
			t.Errorf("without affinity_learn every id still reached its process: the learner run proves nothing")
		}
	})
}
