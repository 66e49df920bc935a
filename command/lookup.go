package command

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"

	"github.com/spf13/cobra"

	"github.com/caddy-affinity/caddy-affinity/adminapi"
	"github.com/caddy-affinity/caddy-affinity/affinity"
	"github.com/caddy-affinity/caddy-affinity/affinity/keys"
)

// lookupCommand builds `caddy affinity lookup`.
func lookupCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "lookup [--source <kind>] [--name <name>] [--json] <key | cookie header>",
		Short: "Explains where a session goes now, and why",
		Long: `
Asks the admin API's lookup (GET /affinity/lookup) where a request
carrying a session key goes now, for every proxy using lb_policy
affinity, and why: the session table's entry, the pin, the ring walk
with the upstreams it passed over. Nothing changes: the entry's expiry
does not slide.

The argument is a key value, read as each proxy's first key (--source
and --name pick another: ` + keySourceNames() + `;
--source pin reads it as a pin cookie), or a whole
Cookie header as a browser sends it ('Cookie: a=1; caddy_affinity=...'
or 'a=1; b=2'): then each cookie is looked up by its name, the pin
cookie first, as a request would be decided.

  caddy affinity lookup hw6hNbNK...
  caddy affinity lookup --source client_ip 203.0.113.7
  caddy affinity lookup 'JSESSIONID=0A1B2C3D.node1; caddy_affinity=AbC...'
  caddy affinity lookup -- -nciDKG9N...   (a key that starts with '-')
`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			addr, err := adminAddress(cmd)
			if err != nil {
				return err
			}
			source, _ := cmd.Flags().GetString("source")
			name, _ := cmd.Flags().GetString("name")
			asJSON, _ := cmd.Flags().GetBool("json")
			return runLookup(cmd.Context(), cmd.OutOrStdout(), addr, args[0], source, name, asJSON)
		},
	}
	addAdminFlags(cmd)
	// One base64url session id in 64 starts with '-', which reads as a
	// flag: the error says how to pass it.
	cmd.SetFlagErrorFunc(func(c *cobra.Command, err error) error {
		hint := ""
		if strings.Contains(err.Error(), "shorthand") {
			hint = ": a key that starts with '-' goes after '--' (caddy affinity lookup -- <key>)"
		}
		return fmt.Errorf("%v%s (see '%s --help')", err, hint, c.CommandPath())
	})
	cmd.Flags().String("source", "", "The key source to read the value as (default: each proxy's first key); pin for a pin cookie")
	cmd.Flags().String("name", "", "The cookie, header or query name of --source")
	cmd.Flags().Bool("json", false, "Print the admin API's JSON")
	return cmd
}

// keySourceNames lists the kinds of key source (keys.Kinds).
func keySourceNames() string {
	var names []string
	for _, k := range keys.Kinds() {
		names = append(names, k.Name)
	}
	return strings.Join(names, ", ")
}

// lookupQuery is one lookup to ask: a value, read as source and name.
type lookupQuery struct{ source, name, value string }

// label names the query in the output.
func (q lookupQuery) label() string {
	switch {
	case q.source == "" && q.name == "":
		return "key"
	case q.name == "":
		return q.source
	}
	return q.source + " " + q.name
}

// cookieHeader returns the cookies of arg when it is a Cookie header
// ("Cookie: a=1; b=2" or "a=1; b=2"), else nil. A lone key value may
// contain "=" (base64 padding), so a header is a list of name=value
// pairs whose names are valid cookie names.
func cookieHeader(arg string) []*http.Cookie {
	v := strings.TrimSpace(arg)
	if len(v) > 7 && strings.EqualFold(v[:7], "cookie:") {
		v = strings.TrimSpace(v[7:])
	}
	if !strings.Contains(v, "=") || strings.HasPrefix(v, "=") {
		return nil
	}
	cookies, err := http.ParseCookie(v)
	if err != nil || len(cookies) == 0 {
		return nil
	}
	return cookies
}

// lookupQueries turns the argument into the lookups to ask: one for a
// key value, or one per cookie of a Cookie header, the pin cookies (the
// names the running policies use) first.
func lookupQueries(ctx context.Context, addr, arg, source, name string) ([]lookupQuery, error) {
	cookies := cookieHeader(arg)
	if source != "" || name != "" || cookies == nil {
		return []lookupQuery{{source, name, arg}}, nil
	}
	var st struct {
		Policies []affinity.PolicyInfo `json:"policies"`
	}
	if err := adminCall(ctx, addr, http.MethodGet, adminapi.StatusPath, nil, &st); err != nil {
		return nil, err
	}
	pins := map[string]bool{}
	for _, p := range st.Policies {
		pins[p.PinCookie] = true
	}
	var first, rest []lookupQuery
	for _, c := range cookies {
		if pins[c.Name] {
			first = append(first, lookupQuery{"pin", "", c.Value})
		} else {
			rest = append(rest, lookupQuery{"cookie", c.Name, c.Value})
		}
	}
	return append(first, rest...), nil
}

// runLookup asks the lookups and prints the explanations.
func runLookup(ctx context.Context, out io.Writer, addr, arg, source, name string, asJSON bool) error {
	queries, err := lookupQueries(ctx, addr, arg, source, name)
	if err != nil {
		return err
	}
	var answers []json.RawMessage
	shown := 0
	for _, q := range queries {
		params := url.Values{"key": {q.value}}
		if q.source != "" {
			params.Set("source", q.source)
		}
		if q.name != "" {
			params.Set("name", q.name)
		}
		var raw json.RawMessage
		if err := adminCall(ctx, addr, http.MethodGet, adminapi.LookupPath+"?"+params.Encode(), nil, &raw); err != nil {
			return fmt.Errorf("lookup of %s: %v", q.label(), err)
		}
		if asJSON {
			answers = append(answers, raw)
			continue
		}
		var resp struct {
			Policies []affinity.Explanation `json:"policies"`
		}
		if err := json.Unmarshal(raw, &resp); err != nil {
			return fmt.Errorf("decoding the lookup: %v", err)
		}
		for _, e := range resp.Policies {
			// A cookie of a header that no proxy reads is not news.
			if e.Error != "" && len(queries) > 1 {
				continue
			}
			printExplanation(out, e)
			shown++
		}
	}
	if asJSON {
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		if len(answers) == 1 {
			return enc.Encode(answers[0])
		}
		return enc.Encode(answers)
	}
	if shown == 0 {
		return fmt.Errorf("no proxy reads any of these cookies as a key or pin: try a single key value, or --source and --name")
	}
	return nil
}

// printExplanation prints one policy's answer in a few lines.
func printExplanation(out io.Writer, e affinity.Explanation) {
	where := e.Server
	if len(e.Hosts) > 0 {
		where += " " + strings.Join(e.Hosts, ",")
	}
	fmt.Fprintf(out, "%s  (%s)\n", where, e.Key)
	if e.Error != "" {
		fmt.Fprintf(out, "  cannot look up: %s\n\n", e.Error)
		return
	}
	to := "no upstream"
	if e.Upstream != nil {
		to = *e.Upstream
	}
	fmt.Fprintf(out, "  -> %s  (%s)\n", to, e.Decision)
	if e.Reason != "" {
		fmt.Fprintf(out, "  %s\n", e.Reason)
	}
	if len(e.Walk) > 0 {
		steps := make([]string, 0, len(e.Walk))
		for _, s := range e.Walk {
			switch {
			case s.Skipped != "":
				steps = append(steps, s.Upstream+" skipped ("+s.Skipped+")")
			default:
				steps = append(steps, s.Upstream)
			}
		}
		fmt.Fprintf(out, "  ring walk: %s\n", strings.Join(steps, " -> "))
	}
	fmt.Fprintln(out)
}
