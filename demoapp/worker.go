// Package demoapp is a small web app that keeps its sessions in process
// memory, the way ASP.NET InProc, Tomcat's default manager and
// express-session's MemoryStore do. It is what caddy-affinity exists
// for: a request that reaches a worker other than the one holding its
// session finds no session, and a restarted worker has lost them all.
//
// Every visit increments a per-session counter and reports it, so a
// client sees a broken session as a counter that did not go up by one.
package demoapp

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"html/template"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// DefaultCookieName is the session cookie's name when NewWorker is given "".
const DefaultCookieName = "session_id"

// Session lifetimes, the same as ASP.NET's defaults: the idle timeout is
// what a proxy's session_ttl should match.
const (
	sessionLifetime    = 24 * time.Hour
	sessionIdleTimeout = 20 * time.Minute
	// sweepInterval only bounds the memory held by expired sessions;
	// expired ones are never served whatever it is.
	sweepInterval = time.Minute
)

// Worker is one instance of the app: a name, a session store in its own
// memory, and (once started) a listener. Its methods are safe for
// concurrent use.
type Worker struct {
	name       string
	cookieName string

	// sessions is swapped for an empty one by Start and Kill, which is
	// how a restart loses every session. Handler reads it per request,
	// so a Handler taken before a restart serves the new store.
	sessions atomic.Pointer[sessionStore]
	requests atomic.Int64

	mu   sync.Mutex   // guards srv and addr
	srv  *http.Server // nil when not running
	addr string       // last listen address, kept after Kill for restarts
}

// session is one visitor's state, as an InProc session would hold it.
type session struct {
	visits  int
	created time.Time
	seen    time.Time
}

// live reports whether the session may still be served at now.
func (s *session) live(now time.Time) bool {
	return now.Sub(s.seen) < sessionIdleTimeout && now.Sub(s.created) < sessionLifetime
}

// sessionStore is one life of a worker's session memory: token → session.
// The standard library is all it needs, so that a production Caddy, which
// links this package for `caddy affinity demo`, carries no session
// library of its own.
type sessionStore struct {
	mu        sync.Mutex
	byToken   map[string]*session
	nextSweep time.Time
}

func newSessionStore() *sessionStore {
	return &sessionStore{byToken: map[string]*session{}, nextSweep: time.Now().Add(sweepInterval)}
}

// visit counts one visit of the session named by token (a new session,
// with a new token, when it names none that is live) and returns the
// token and the count.
func (st *sessionStore) visit(token string, now time.Time) (string, int) {
	st.mu.Lock()
	defer st.mu.Unlock()
	st.sweepLocked(now)
	s := st.byToken[token]
	if s == nil || !s.live(now) {
		delete(st.byToken, token)
		token = newToken()
		s = &session{created: now}
		st.byToken[token] = s
	}
	s.visits++
	s.seen = now
	return token, s.visits
}

// sweepLocked drops expired sessions, at most once a sweepInterval.
func (st *sessionStore) sweepLocked(now time.Time) {
	if now.Before(st.nextSweep) {
		return
	}
	st.nextSweep = now.Add(sweepInterval)
	for token, s := range st.byToken {
		if !s.live(now) {
			delete(st.byToken, token)
		}
	}
}

// live returns the number of live sessions.
func (st *sessionStore) live() int {
	st.mu.Lock()
	defer st.mu.Unlock()
	now, n := time.Now(), 0
	for _, s := range st.byToken {
		if s.live(now) {
			n++
		}
	}
	return n
}

// newToken returns a session token: 32 random bytes, as session
// libraries make them.
func newToken() string {
	b := make([]byte, 32)
	_, _ = rand.Read(b)
	return base64.RawURLEncoding.EncodeToString(b)
}

// NewWorker returns a worker called name whose session cookie is
// cookieName (DefaultCookieName when empty): e.g. "JSESSIONID",
// "ASP.NET_SessionId" or "connect.sid" to look like those stacks. Its
// Handler works at once; Start also serves it on a listener.
func NewWorker(name, cookieName string) *Worker {
	if cookieName == "" {
		cookieName = DefaultCookieName
	}
	w := &Worker{name: name, cookieName: cookieName}
	w.sessions.Store(newSessionStore())
	return w
}

// Name returns the worker's name, as reported in every response.
func (w *Worker) Name() string { return w.name }

// Handler returns the app: /healthz answers "ok", every other path is a
// visit (see the package doc).
func (w *Worker) Handler() http.Handler {
	return http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/healthz" {
			// Not counted in Requests: health checks arrive every
			// second or so and would drown the traffic tests look at.
			rw.Header().Set("Content-Type", "text/plain; charset=utf-8")
			rw.Header().Set("X-Worker", w.name)
			_, _ = rw.Write([]byte("ok"))
			return
		}
		w.requests.Add(1)
		w.visit(rw, r)
	})
}

// swapSessions installs an empty session memory; the old one is dropped
// with every session in it.
func (w *Worker) swapSessions() { w.sessions.Store(newSessionStore()) }

// visitReply is the JSON body of a visit.
type visitReply struct {
	Worker  string `json:"worker"`
	Visits  int    `json:"visits"`
	Session string `json:"session"`
}

var visitPage = template.Must(template.New("visit").Parse(`<!doctype html>
<html><head><meta charset="utf-8"><title>{{.Worker}}: visit {{.Visits}}</title>
<style>body{font-family:sans-serif;margin:3em}b{font-size:2em}</style></head>
<body>
<p>Worker <b>{{.Worker}}</b></p>
<p>Visits in this session: <b>{{.Visits}}</b></p>
<p>Session <code>{{.Session}}</code></p>
<p>Refresh: the counter goes on; a different worker would restart it at 1.</p>
</body></html>
`))

// visit counts one visit in the request's session and reports it. The
// session cookie is set on every visit (as session libraries do when the
// session changed): a browser-session cookie, like ASP.NET's and
// Tomcat's.
func (w *Worker) visit(rw http.ResponseWriter, r *http.Request) {
	var token string
	if c, err := r.Cookie(w.cookieName); err == nil {
		token = c.Value
	}
	token, n := w.sessions.Load().visit(token, time.Now())
	sum := sha256.Sum256([]byte(token))
	reply := visitReply{Worker: w.name, Visits: n, Session: hex.EncodeToString(sum[:4])}

	h := rw.Header()
	http.SetCookie(rw, &http.Cookie{Name: w.cookieName, Value: token, Path: "/", HttpOnly: true, SameSite: http.SameSiteLaxMode})
	h.Set("X-Worker", w.name)
	// The counter changes on every visit: nothing on the way may cache it.
	h.Set("Cache-Control", "no-store")
	if strings.Contains(r.Header.Get("Accept"), "text/html") {
		h.Set("Content-Type", "text/html; charset=utf-8")
		_ = visitPage.Execute(rw, reply)
		return
	}
	h.Set("Content-Type", "application/json")
	_ = json.NewEncoder(rw).Encode(reply)
}

// Start listens on addr ("127.0.0.1:0" picks a free port) and serves
// Handler in the background. Every Start begins with an empty session
// memory, so Kill then Start is a restart that lost every session. It
// fails if the worker is already running.
func (w *Worker) Start(addr string) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.srv != nil {
		return fmt.Errorf("worker %s: already running on %s", w.name, w.addr)
	}
	ln, err := net.Listen("tcp", addr)
	for try := 0; err != nil && errors.Is(err, syscall.EADDRINUSE) && try < 40; try++ {
		// Restarting in place right after Kill: the old listener's
		// close can take a moment to release the port on a busy host.
		time.Sleep(50 * time.Millisecond)
		ln, err = net.Listen("tcp", addr)
	}
	if err != nil {
		return fmt.Errorf("worker %s: %w", w.name, err)
	}
	w.swapSessions()
	srv := &http.Server{
		Handler:           w.Handler(),
		ReadHeaderTimeout: 10 * time.Second,
	}
	w.srv = srv
	w.addr = ln.Addr().String()
	go func() {
		// ErrServerClosed after Kill or Shutdown is the normal end.
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			w.mu.Lock()
			if w.srv == srv {
				w.srv = nil
			}
			w.mu.Unlock()
		}
	}()
	return nil
}

// Addr returns the address the worker listens on ("127.0.0.1:port"),
// or listened on last if it was killed: Start(w.Addr()) restarts it in
// place. It is "" before the first Start.
func (w *Worker) Addr() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.addr
}

// Running reports whether the worker is serving on a listener.
func (w *Worker) Running() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.srv != nil
}

// Kill stops the worker abruptly, as kill -9 would stop a process: the
// listener and every open connection close at once, mid-request or not,
// and the session memory is gone. It does nothing if the worker is not
// running.
func (w *Worker) Kill() {
	w.mu.Lock()
	srv := w.srv
	w.srv = nil
	w.mu.Unlock()
	if srv == nil {
		return
	}
	_ = srv.Close()
	w.swapSessions()
}

// Shutdown stops the worker gracefully: it stops accepting connections
// and waits for requests in flight, or for ctx to end. The sessions are
// lost all the same, since they live in memory only.
func (w *Worker) Shutdown(ctx context.Context) error {
	w.mu.Lock()
	srv := w.srv
	w.srv = nil
	w.mu.Unlock()
	if srv == nil {
		return nil
	}
	err := srv.Shutdown(ctx)
	w.swapSessions()
	return err
}

// Sessions returns the number of live (unexpired) sessions in the
// worker's memory.
func (w *Worker) Sessions() int { return w.sessions.Load().live() }

// Requests returns the number of visits the worker has served since
// NewWorker, across restarts. Health checks (/healthz) are not counted.
func (w *Worker) Requests() int64 { return w.requests.Load() }
