package tests

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// The docs test: every caddyfile and JSON block of README.md, docs/*.md
// and Caddyfile.example goes through the built binary, so that a
// renamed option or a changed syntax fails here and not in a reader's
// hands. A block is run as it is, unless the line before its fence is a
// marker:
//
//	<!-- fragment: site -->           the lines of a site block
//	<!-- fragment: reverse_proxy -->  the lines of a reverse_proxy block
//	<!-- fragment: lb_policy -->      the lines of lb_policy affinity { }
//	<!-- fragment: policy -->         (JSON) the selection policy object
//	<!-- syntax -->                   a synopsis with <placeholders>: not run
//	<!-- api-response -->             (JSON) an answer of the API: valid JSON only
//
// A caddyfile block goes through `caddy adapt`, a JSON config through
// `caddy validate` (which provisions every module, in a temp HOME).

// docBlock is one fenced block of a document.
type docBlock struct {
	file   string
	line   int
	lang   string
	marker string
	body   string
}

func (b docBlock) String() string { return fmt.Sprintf("%s:%d (%s)", b.file, b.line, b.lang) }

var fenceMarker = regexp.MustCompile(`^<!--\s*(fragment:\s*[a-z_]+|syntax|api-response)\s*-->$`)

// docFiles returns the documents the docs test reads.
func docFiles(t *testing.T) []string {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(repoRoot, "docs", "*.md"))
	if err != nil {
		t.Fatal(err)
	}
	return append([]string{filepath.Join(repoRoot, "README.md")}, files...)
}

// docBlocks returns the caddyfile and json blocks of a Markdown file.
func docBlocks(t *testing.T, path string) []docBlock {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	rel, _ := filepath.Rel(repoRoot, path)
	lines := strings.Split(string(data), "\n")
	var blocks []docBlock
	for i := 0; i < len(lines); i++ {
		lang, ok := strings.CutPrefix(lines[i], "```")
		if !ok || lang == "" {
			if ok { // a fence with no language: skip to its end
				for i++; i < len(lines) && lines[i] != "```"; i++ {
				}
			}
			continue
		}
		b := docBlock{file: rel, line: i + 1, lang: lang}
		if i > 0 {
			if m := fenceMarker.FindStringSubmatch(strings.TrimSpace(lines[i-1])); m != nil {
				b.marker = strings.ReplaceAll(m[1], " ", "")
			}
		}
		var body []string
		for i++; i < len(lines) && lines[i] != "```"; i++ {
			body = append(body, lines[i])
		}
		b.body = strings.Join(body, "\n") + "\n"
		if lang == "caddyfile" || lang == "json" {
			blocks = append(blocks, b)
		}
	}
	return blocks
}

// wrapCaddyfile makes a fragment a whole Caddyfile.
func wrapCaddyfile(t *testing.T, b docBlock) string {
	t.Helper()
	switch b.marker {
	case "":
		return b.body
	case "fragment:site":
		return ":8080 {\n" + b.body + "}\n"
	case "fragment:reverse_proxy":
		return ":8080 {\nreverse_proxy 127.0.0.1:9001 127.0.0.1:9002 {\n" + b.body + "}\n}\n"
	case "fragment:lb_policy":
		return ":8080 {\nreverse_proxy 127.0.0.1:9001 127.0.0.1:9002 {\nlb_policy affinity {\n" + b.body + "}\n}\n}\n"
	}
	t.Fatalf("%s: marker %q does not apply to a caddyfile block", b, b.marker)
	return ""
}

// wrapJSON makes a JSON fragment a whole config.
func wrapJSON(t *testing.T, b docBlock) string {
	t.Helper()
	switch b.marker {
	case "":
		return b.body
	case "fragment:policy":
		return `{"apps":{"http":{"servers":{"docs":{"listen":[":8080"],"routes":[{"handle":[{"handler":"reverse_proxy",
			"upstreams":[{"dial":"127.0.0.1:9001"},{"dial":"127.0.0.1:9002"}],
			"load_balancing":{"selection_policy":` + b.body + `}}]}]}}}}}`
	}
	t.Fatalf("%s: marker %q does not apply to a JSON block", b, b.marker)
	return ""
}

func TestDocsConfigsAdapt(t *testing.T) {
	needCaddy(t)
	var blocks []docBlock
	for _, f := range docFiles(t) {
		blocks = append(blocks, docBlocks(t, f)...)
	}
	example, err := os.ReadFile(filepath.Join(repoRoot, "Caddyfile.example"))
	if err != nil {
		t.Fatal(err)
	}
	blocks = append(blocks, docBlock{file: "Caddyfile.example", line: 1, lang: "caddyfile", body: string(example)})
	if len(blocks) < 10 {
		t.Fatalf("found only %d blocks: the extraction is broken", len(blocks))
	}
	dir := t.TempDir()
	ran, skipped := 0, 0
	for i, b := range blocks {
		switch {
		case b.marker == "syntax":
			skipped++
			continue
		case b.marker == "api-response":
			if b.lang != "json" || !json.Valid([]byte(b.body)) {
				t.Errorf("%s: an API answer that is not valid JSON", b)
			}
			continue
		}
		var file string
		var args []string
		if b.lang == "caddyfile" {
			file = filepath.Join(dir, fmt.Sprintf("block%d.Caddyfile", i))
			writeFile(t, file, wrapCaddyfile(t, b))
			args = []string{"adapt", "--config", file, "--adapter", "caddyfile"}
		} else {
			file = filepath.Join(dir, fmt.Sprintf("block%d.json", i))
			writeFile(t, file, wrapJSON(t, b))
			args = []string{"validate", "--config", file}
		}
		cmd := exec.Command(caddyBin, args...)
		home := t.TempDir()
		cmd.Dir, cmd.Env = home, isolatedEnv(home)
		out, err := cmd.CombinedOutput()
		if err != nil {
			cfg, _ := os.ReadFile(file)
			t.Errorf("%s: caddy %s failed: %v\n%s\n---- the config:\n%s", b, args[0], err, tailLines(string(out), 10), cfg)
		}
		ran++
	}
	t.Logf("%d blocks run through caddy adapt/validate, %d syntax synopses not run", ran, skipped)
}

func writeFile(t *testing.T, path, s string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(s), 0o644); err != nil {
		t.Fatal(err)
	}
}

// figure matches a measured figure in prose: a time, size, rate or share
// with its unit, or an "n of m" count.
var figure = regexp.MustCompile(`\b\d[\d,.]*\s?(ns|µs|MiB|KiB|KB|MB|B/session|bytes|req/s|allocs?)\b|\b\d[\d.]*\s?%|\b\d+ of \d+\b`)

// bound precedes a figure that is a limit or a threshold (a rule of the
// code or an alert), not a measurement.
var bound = regexp.MustCompile(`(than|over|under|least|most|up to|bounded to|≤|<|>)\s*$`)

// measuredFigure returns the first figure of para that is not a bound.
func measuredFigure(para string) string {
	for _, loc := range figure.FindAllStringIndex(para, -1) {
		if !bound.MatchString(para[:loc[0]]) {
			return para[loc[0]:loc[1]]
		}
	}
	return ""
}

// source names where a figure comes from: a test, a benchmark, or the
// files that record benchmark and fault-injection runs.
var source = regexp.MustCompile(`Test[A-Z]\w+|Benchmark[A-Z]\w+|BENCHMARKS\.md|RELIABILITY\.md|bench/|_test\.go`)

// TestDocsFiguresNameTheirSource: a paragraph (or table) of the docs that
// states a measured figure names the test or benchmark that produced it,
// in itself or in the paragraph just before it.
func TestDocsFiguresNameTheirSource(t *testing.T) {
	for _, f := range docFiles(t) {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		rel, _ := filepath.Rel(repoRoot, f)
		// Code blocks hold configs and commands, not claims.
		text := regexp.MustCompile("(?s)```.*?```").ReplaceAllStringFunc(string(data), func(s string) string {
			return strings.Repeat("\n", strings.Count(s, "\n"))
		})
		line, prevNamed := 1, false
		for _, para := range strings.Split(text, "\n\n") {
			start := line
			line += strings.Count(para, "\n") + 2
			if strings.TrimSpace(para) == "" {
				continue
			}
			if strings.HasPrefix(strings.TrimSpace(para), "#") {
				prevNamed = false // a new section
				continue
			}
			named := source.MatchString(para)
			if m := measuredFigure(para); m != "" && !named && !prevNamed {
				t.Errorf("%s:%d: the figure %q names no test or benchmark (in its paragraph or the one before):\n%s",
					rel, start, m, truncate(strings.TrimSpace(para), 300))
			}
			prevNamed = named
		}
	}
}
