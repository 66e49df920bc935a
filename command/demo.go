package command

import (
	"bytes"
	"context"
	_ "embed"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"text/template"
	"time"

	"github.com/spf13/cobra"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	// The demo's config uses lb_policy affinity: linking this command
	// without the policy would only give a demo that fails to load.
	_ "github.com/caddy-affinity/caddy-affinity/affinity"
	"github.com/caddy-affinity/caddy-affinity/demoapp"

	"github.com/caddy-affinity/caddy-affinity/adminapi"
	"github.com/caddy-affinity/caddy-affinity/healthcheck"
)

//go:embed demo.Caddyfile
var demoCaddyfile string

var demoTemplate = template.Must(template.New("demo.Caddyfile").
	Funcs(template.FuncMap{"join": strings.Join}).
	Parse(demoCaddyfile))

// maxDemoWorkers bounds --workers: each worker is a listener and a name
// in the output, and a demo needs a handful.
const maxDemoWorkers = 26

// demoOptions are the flags of `caddy affinity demo`.
type demoOptions struct {
	Listen    string // the proxy's address, [host]:port
	Admin     string // Caddy's admin API address
	Control   string // the kill/start switch's address
	Cookie    string // the workers' session cookie name
	Workers   int
	FirstPort int
}

// workerNames returns the workers' names, A, B, C...: short enough to
// type in the control URLs.
func (o demoOptions) workerNames() []string {
	names := make([]string, o.Workers)
	for i := range names {
		names[i] = string(rune('A' + i))
	}
	return names
}

// workerAddrs returns the workers' listen addresses, one port each from
// FirstPort on; with FirstPort 0, each worker picks a free port.
func (o demoOptions) workerAddrs() []string {
	addrs := make([]string, o.Workers)
	for i := range addrs {
		port := 0
		if o.FirstPort != 0 {
			port = o.FirstPort + i
		}
		addrs[i] = net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	}
	return addrs
}

// check rejects options that would render a broken Caddyfile or start
// nothing.
func (o demoOptions) check() error {
	if o.Workers < 1 || o.Workers > maxDemoWorkers {
		return fmt.Errorf("--workers %d: want 1 to %d", o.Workers, maxDemoWorkers)
	}
	if o.FirstPort < 0 || o.FirstPort+o.Workers-1 > 65535 {
		return fmt.Errorf("--first-port %d: the %d worker ports must be within 1..65535 (or 0: free ports)", o.FirstPort, o.Workers)
	}
	if _, _, err := splitListen(o.Listen); err != nil {
		return err
	}
	for flag, addr := range map[string]string{"admin": o.Admin, "control": o.Control} {
		if _, _, err := net.SplitHostPort(addr); err != nil || strings.ContainsAny(addr, " \t{}#\"") {
			return fmt.Errorf("--%s %q: want host:port", flag, addr)
		}
	}
	return checkCookieName(o.Cookie)
}

// splitListen splits the proxy's address. The host may be empty (all
// interfaces); the port must be a number because it goes into the site
// address.
func splitListen(listen string) (host string, port int, err error) {
	host, p, err := net.SplitHostPort(listen)
	if err == nil {
		port, err = strconv.Atoi(p)
	}
	if err != nil || port < 1 || port > 65535 || strings.ContainsAny(host, " \t{}#\"") {
		return "", 0, fmt.Errorf("--listen %q: want [host]:port, e.g. 127.0.0.1:8080 or :8080", listen)
	}
	return host, port, nil
}

// checkCookieName rejects names that are not cookie names, which also
// keeps them from breaking the Caddyfile they are written into.
func checkCookieName(name string) error {
	c := http.Cookie{Name: name, Value: "x"}
	if err := c.Valid(); err != nil || strings.HasPrefix(name, "#") {
		return fmt.Errorf("--cookie %q is not a valid cookie name", name)
	}
	return nil
}

// caddyfile renders the demo's Caddyfile from the options, for workers
// on upstreams and Caddy's storage in the folder storage.
func (o demoOptions) caddyfile(upstreams []string, storage string) ([]byte, error) {
	host, port, err := splitListen(o.Listen)
	if err != nil {
		return nil, err
	}
	// The site address is only a port, with bind for the host: a host in
	// the site address would also be a Host matcher, and the demo would
	// answer nothing to http://localhost:8080 when listening on 127.0.0.1.
	if strings.ContainsAny(storage, " \t\n{}#\"") {
		return nil, fmt.Errorf("the demo's storage folder %q has characters a Caddyfile cannot take: set TMPDIR to a plain path", storage)
	}
	data := struct {
		Admin, Host, Cookie, Storage string
		Port                         int
		Upstreams, Origins           []string
	}{o.Admin, host, o.Cookie, storage, port, upstreams, adminOrigins(o.Admin)}
	var buf bytes.Buffer
	if err := demoTemplate.Execute(&buf, data); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// adminOrigins returns the Host values (and origins) under which a
// browser may reach the admin API at admin: the address itself and, for
// a loopback or wildcard address, every loopback name of its port. An
// explicit origins list replaces Caddy's default one, which has these.
func adminOrigins(admin string) []string {
	host, port, err := net.SplitHostPort(admin)
	if err != nil {
		return []string{admin}
	}
	origins := []string{admin}
	ip := net.ParseIP(host)
	if host == "" || host == "localhost" || (ip != nil && (ip.IsLoopback() || ip.IsUnspecified())) {
		for _, h := range []string{"127.0.0.1", "localhost", "::1"} {
			if o := net.JoinHostPort(h, port); o != admin {
				origins = append(origins, o)
			}
		}
	}
	return origins
}

// statusURL returns the status page's URL on the admin listener.
func statusURL(admin string) string {
	host, port, err := net.SplitHostPort(admin)
	if err != nil {
		return "http://" + admin + adminapi.StatusPath
	}
	if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
		host = "localhost"
	}
	return "http://" + net.JoinHostPort(host, port) + adminapi.StatusPath
}

// demoCommand builds `caddy affinity demo`.
func demoCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "demo [--listen <addr>] [--workers <n>] [--first-port <port>] [--cookie <name>]",
		Short: "Runs demo workers behind Caddy with lb_policy affinity",
		Long: `
Starts --workers demo app workers (A, B, C...) on 127.0.0.1:--first-port
and up, each keeping its sessions in its own memory, and Caddy in front
of them on --listen with lb_policy affinity. Blocks until SIGINT/SIGTERM.

Open the proxy in a browser and refresh: the visit counter goes on,
because every request of the session reaches the same worker. A new
session (another browser, a private window, curl without its cookies)
is placed by its connection, so new sessions spread over the workers.
Kill the worker that answers you with the control URL printed at start:
the next request fails over to another worker, which knows nothing of
the session and starts at 1, and the session stays there. Start the
worker again and the session does not move back.

Caddy's storage is a temp dir of the demo's own, removed on exit: the
demo neither reads nor writes the storage of your own Caddy. The config
Caddy runs is printed with --print-config (a Caddyfile, made from the
flags).
`,
		RunE: caddycmd.WrapCommandFuncForCobra(cmdDemo),
	}
	cmd.Flags().StringP("listen", "l", "127.0.0.1:8080", "Address of the proxy")
	cmd.Flags().IntP("workers", "w", 3, fmt.Sprintf("Number of workers (1 to %d)", maxDemoWorkers))
	cmd.Flags().IntP("first-port", "p", 9001, "Port of the first worker; the others follow (0: free ports)")
	cmd.Flags().StringP("cookie", "c", demoapp.DefaultCookieName, "Session cookie name of the workers, and the policy's key")
	cmd.Flags().String("admin", "127.0.0.1:2019", "Address of Caddy's admin API")
	cmd.Flags().String("control", "127.0.0.1:8081", "Address of the demo's kill/start switch for workers")
	cmd.Flags().Bool("print-config", false, "Print the rendered Caddyfile and exit")
	return cmd
}

func cmdDemo(fs caddycmd.Flags) (int, error) {
	o := demoOptions{
		Listen:    fs.String("listen"),
		Admin:     fs.String("admin"),
		Control:   fs.String("control"),
		Cookie:    fs.String("cookie"),
		Workers:   fs.Int("workers"),
		FirstPort: fs.Int("first-port"),
	}
	if err := o.check(); err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	if fs.Bool("print-config") {
		cfg, err := o.caddyfile(o.workerAddrs(), filepath.Join(os.TempDir(), "caddy-affinity-demo-RANDOM"))
		if err != nil {
			return caddy.ExitCodeFailedStartup, err
		}
		_, _ = os.Stdout.Write(cfg)
		return caddy.ExitCodeSuccess, nil
	}

	// Caught from here on, so that Ctrl-C during start-up still stops
	// what was started.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	storage, err := os.MkdirTemp("", "caddy-affinity-demo-")
	if err != nil {
		return caddy.ExitCodeFailedStartup, fmt.Errorf("the demo's storage folder: %w", err)
	}
	// Deferred first, so it runs last: after Caddy stopped writing.
	defer os.RemoveAll(storage)
	// Caddy writes a few files of its own outside its storage (the
	// instance ID, read by the state syncer, in its data folder; the
	// autosaved config in its config folder): into the temp dir too.
	for env, sub := range map[string]string{"XDG_DATA_HOME": "data", "XDG_CONFIG_HOME": "config"} {
		if err := os.Setenv(env, filepath.Join(storage, sub)); err != nil {
			return caddy.ExitCodeFailedStartup, err
		}
	}

	d := &demo{}
	defer d.stopWorkers()
	for i, name := range o.workerNames() {
		w := demoapp.NewWorker(name, o.Cookie)
		if err := w.Start(o.workerAddrs()[i]); err != nil {
			return caddy.ExitCodeFailedStartup, err
		}
		d.workers = append(d.workers, w)
	}
	cfgJSON, err := adaptDemo(o, d.addrs(), storage)
	if err != nil {
		return caddy.ExitCodeFailedStartup, err
	}

	ctl := &http.Server{Handler: d.controlHandler(), ReadHeaderTimeout: 10 * time.Second}
	ln, err := net.Listen("tcp", o.Control)
	if err != nil {
		return caddy.ExitCodeFailedStartup, fmt.Errorf("control listener: %w", err)
	}
	go func() { _ = ctl.Serve(ln) }()
	defer ctl.Close()

	if err := caddy.Load(cfgJSON, true); err != nil {
		return caddy.ExitCodeFailedStartup, fmt.Errorf("loading the demo config: %w", err)
	}
	defer func() { _ = caddy.Stop() }()

	printDemo(o, d, ln.Addr().String(), storage)

	<-ctx.Done()
	fmt.Println("stopping; removing " + storage)
	return caddy.ExitCodeSuccess, nil
}

// adaptDemo renders the demo's Caddyfile and adapts it to JSON.
func adaptDemo(o demoOptions, upstreams []string, storage string) ([]byte, error) {
	cfgFile, err := o.caddyfile(upstreams, storage)
	if err != nil {
		return nil, err
	}
	adapter := caddyconfig.GetAdapter("caddyfile")
	if adapter == nil {
		return nil, errors.New("the caddyfile config adapter is not in this binary")
	}
	cfgJSON, warnings, err := adapter.Adapt(cfgFile, map[string]any{"filename": "demo.Caddyfile"})
	if err != nil {
		return nil, fmt.Errorf("adapting the demo config: %w", err)
	}
	for _, w := range warnings {
		caddy.Log().Warn(w.String())
	}
	return cfgJSON, nil
}

// printDemo tells the newcomer where everything is.
func printDemo(o demoOptions, d *demo, control, storage string) {
	host, port, _ := splitListen(o.Listen)
	if host == "" || net.ParseIP(host).IsUnspecified() {
		host = "localhost"
	}
	proxy := "http://" + net.JoinHostPort(host, strconv.Itoa(port)) + "/"
	var b strings.Builder
	fmt.Fprintf(&b, "\ncaddy-affinity demo: %d workers behind lb_policy affinity (key: cookie %s; a new session is placed by its connection)\n\n", len(d.workers), o.Cookie)
	fmt.Fprintf(&b, "  proxy       %s\n", proxy)
	fmt.Fprintf(&b, "              open it in a browser and refresh; a private window is a new session\n")
	fmt.Fprintf(&b, "              or: curl -b /tmp/jar -c /tmp/jar %s\n", proxy)
	for _, w := range d.workers {
		fmt.Fprintf(&b, "  worker %s    http://%s/\n", w.Name(), w.Addr())
	}
	fmt.Fprintf(&b, "  status      %s   (open it: states, sessions, drain buttons)\n", statusURL(o.Admin))
	fmt.Fprintf(&b, "              or: %s affinity status --address %s\n", os.Args[0], o.Admin)
	fmt.Fprintf(&b, "  upstreams   http://%s/affinity/upstreams   (admin API, JSON)\n", o.Admin)
	fmt.Fprintf(&b, "  storage     %s   (the demo's own, removed on exit)\n\n", storage)
	fmt.Fprintf(&b, "  workers     http://%s/__demo/\n", control)
	for _, w := range d.workers {
		fmt.Fprintf(&b, "  kill %s      curl -X POST http://%s/__demo/kill/%s    start again: curl -X POST http://%s/__demo/start/%s\n",
			w.Name(), control, w.Name(), control, w.Name())
	}
	b.WriteString("\nKill the worker that answers you and refresh: the session fails over\n" +
		"once (the counter restarts at 1 on another worker) and stays there.\n" +
		"Ctrl-C stops the demo.\n\n")
	fmt.Print(b.String())
}

// demo is the running demo's workers, and the switch that kills and
// starts them.
type demo struct {
	workers []*demoapp.Worker
	// healthy reports Caddy's health verdict on a dial address; nil
	// reads it from the running Caddy (package healthcheck).
	healthy func(dial string) (healthy, known bool)
}

// addrs returns the workers' addresses, in order.
func (d *demo) addrs() []string {
	addrs := make([]string, len(d.workers))
	for i, w := range d.workers {
		addrs[i] = w.Addr()
	}
	return addrs
}

// worker finds a worker by name, in any case ("a" finds A).
func (d *demo) worker(name string) *demoapp.Worker {
	for _, w := range d.workers {
		if strings.EqualFold(w.Name(), name) {
			return w
		}
	}
	return nil
}

// stopWorkers kills every worker; the demo is over, their sessions with it.
func (d *demo) stopWorkers() {
	for _, w := range d.workers {
		w.Kill()
	}
}

// caddyHealthy is Caddy's health verdict on dial, as the policy reads it.
func caddyHealthy(dial string) (healthy, known bool) {
	for _, u := range healthcheck.All() {
		if u.Dial == dial {
			return u.Healthy(), true
		}
	}
	return false, false
}

// waitHealthy waits up to max for Caddy to call dial healthy and says
// what it saw, so that what the switch prints is what happened.
func (d *demo) waitHealthy(dial string, max time.Duration) string {
	healthy := d.healthy
	if healthy == nil {
		healthy = caddyHealthy
	}
	start := time.Now()
	for {
		ok, known := healthy(dial)
		waited := time.Since(start)
		switch {
		case ok && known:
			return fmt.Sprintf("Caddy's health check calls it healthy (after %s)", waited.Round(10*time.Millisecond))
		case waited >= max:
			return fmt.Sprintf("Caddy's health check has not called it healthy after %s: new sessions avoid it until it does", max)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// workerStatus is one worker in the control listing.
type workerStatus struct {
	Name     string `json:"name"`
	Addr     string `json:"addr"`
	Running  bool   `json:"running"`
	Sessions int    `json:"sessions"`
	Requests int64  `json:"requests"`
}

// loopbackHost reports whether a request's Host names this machine by a
// loopback name: localhost, or a loopback IP address. A name a web page
// made resolve to 127.0.0.1 (DNS rebinding) is none of them.
func loopbackHost(hostport string) bool {
	host := hostport
	if h, _, err := net.SplitHostPort(hostport); err == nil {
		host = h
	}
	host = strings.TrimSuffix(strings.TrimPrefix(host, "["), "]")
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// refuseForeign refuses, with 403, a request that did not come from this
// machine's own pages or tools: its Host is not a loopback name (DNS
// rebinding), it carries an Origin other than the switch's own, or
// Sec-Fetch-Site says another site made it. curl and scripts send
// neither Origin nor Sec-Fetch-Site.
func refuseForeign(w http.ResponseWriter, r *http.Request) bool {
	if !loopbackHost(r.Host) {
		http.Error(w, "refused: Host "+strconv.Quote(r.Host)+" is not a loopback name (localhost, 127.0.0.1, [::1])", http.StatusForbidden)
		return true
	}
	origin := r.Header.Get("Origin")
	site := r.Header.Get("Sec-Fetch-Site")
	if site == "cross-site" || site == "same-site" || (origin != "" && origin != "http://"+r.Host) {
		http.Error(w, "refused: a cross-site request; use curl -X POST", http.StatusForbidden)
		return true
	}
	return false
}

// controlHandler serves the demo's switch:
//
//	GET  /__demo/              the workers, running or not, with their counts
//	POST /__demo/kill/<name>   kill the worker, as kill -9 would
//	POST /__demo/start/<name>  start it again on its address, sessions empty
//
// The switches are POSTs that refuse what a web page could send (see
// refuseForeign): a link, a form or a script on any web page could
// otherwise kill the demo's workers, since the listener is on the
// visitor's own loopback.
func (d *demo) controlHandler() http.Handler {
	mux := http.NewServeMux()
	list := func(w http.ResponseWriter, r *http.Request) {
		ws := make([]workerStatus, 0, len(d.workers))
		for _, wk := range d.workers {
			ws = append(ws, workerStatus{wk.Name(), wk.Addr(), wk.Running(), wk.Sessions(), wk.Requests()})
		}
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		_ = enc.Encode(ws)
	}
	mux.HandleFunc("GET /{$}", list)
	mux.HandleFunc("GET /__demo/{$}", list)
	mux.HandleFunc("POST /__demo/kill/{name}", func(w http.ResponseWriter, r *http.Request) {
		if refuseForeign(w, r) {
			return
		}
		wk := d.worker(r.PathValue("name"))
		if wk == nil {
			http.Error(w, "no worker "+r.PathValue("name"), http.StatusNotFound)
			return
		}
		if !wk.Running() {
			http.Error(w, "worker "+wk.Name()+" is not running", http.StatusConflict)
			return
		}
		n := wk.Sessions()
		wk.Kill()
		fmt.Fprintf(w, "killed worker %s (%s): its %d sessions are gone, and its clients fail over on their next request\n", wk.Name(), wk.Addr(), n)
	})
	mux.HandleFunc("POST /__demo/start/{name}", func(w http.ResponseWriter, r *http.Request) {
		if refuseForeign(w, r) {
			return
		}
		wk := d.worker(r.PathValue("name"))
		if wk == nil {
			http.Error(w, "no worker "+r.PathValue("name"), http.StatusNotFound)
			return
		}
		if err := wk.Start(wk.Addr()); err != nil {
			http.Error(w, err.Error(), http.StatusConflict)
			return
		}
		fmt.Fprintf(w, "started worker %s (%s) with no sessions; %s\n", wk.Name(), wk.Addr(), d.waitHealthy(wk.Addr(), 3*time.Second))
	})
	return mux
}
