// MonoHost serves one ASP.NET application with Mono's System.Web, as
// xsp4 does: an HttpListener on the given address and port hands each
// request to HttpRuntime.ProcessRequest through a worker request.
//
// Why not xsp4 itself: Debian's mono-xsp4 4.2 does not start on Mono 6.8
// (TypeLoadException: Mono.Security.Protocol.Tls.PrivateKeySelectionCallback
// is gone from Mono.Security; mono/mono#18500). Everything the test is
// about (session ids, the cookieless redirect, the InProc store) is in
// System.Web, which this host runs unchanged.
//
// Usage: mono bin/MonoHost.exe <address> <port> <application directory>
// (this assembly must be in the application's bin directory, where the
// application's AppDomain loads it from).
using System;
using System.Collections.Generic;
using System.IO;
using System.Net;
using System.Threading;
using System.Web;
using System.Web.Hosting;

public class MonoHost : MarshalByRefObject
{
	public static int Main (string[] args)
	{
		if (args.Length != 3) {
			Console.Error.WriteLine ("usage: MonoHost.exe <address> <port> <application directory>");
			return 2;
		}
		string root = Path.GetFullPath (args [2]);
		MonoHost host = (MonoHost) ApplicationHost.CreateApplicationHost (typeof (MonoHost), "/", root);
		host.Serve (args [0], int.Parse (args [1]));
		return 0;
	}

	// The host lives as long as the process.
	public override object InitializeLifetimeService ()
	{
		return null;
	}

	// Serve runs in the application's AppDomain.
	public void Serve (string address, int port)
	{
		HttpListener listener = new HttpListener ();
		listener.Prefixes.Add ("http://" + address + ":" + port + "/");
		listener.Start ();
		Console.WriteLine ("MonoHost: listening on http://{0}:{1}/", address, port);
		for (;;) {
			HttpListenerContext ctx = listener.GetContext ();
			HttpRuntime.ProcessRequest (new ListenerWorkerRequest (ctx));
		}
	}
}

// ListenerWorkerRequest is one request of the HttpListener as System.Web
// sees it. The response is buffered and sent at EndOfRequest.
class ListenerWorkerRequest : SimpleWorkerRequest
{
	readonly HttpListenerContext ctx;
	readonly string path, query;
	int status = 200;
	string statusText = "OK";
	readonly List<KeyValuePair<string, string>> headers = new List<KeyValuePair<string, string>> ();
	readonly MemoryStream body = new MemoryStream ();
	bool ended;

	public ListenerWorkerRequest (HttpListenerContext ctx) : base ("", "", null)
	{
		this.ctx = ctx;
		string raw = ctx.Request.RawUrl;
		int q = raw.IndexOf ('?');
		path = q < 0 ? raw : raw.Substring (0, q);
		query = q < 0 ? "" : raw.Substring (q + 1);
		path = HttpUtility.UrlDecode (path);
	}

	public override string GetUriPath () { return path; }
	public override string GetFilePath () { return path; }
	public override string GetPathInfo () { return ""; }
	public override string GetQueryString () { return query; }
	public override string GetRawUrl () { return ctx.Request.RawUrl; }
	public override string GetHttpVerbName () { return ctx.Request.HttpMethod; }
	public override string GetHttpVersion () { return "HTTP/" + ctx.Request.ProtocolVersion; }
	public override string GetRemoteAddress () { return ctx.Request.RemoteEndPoint.Address.ToString (); }
	public override int GetRemotePort () { return ctx.Request.RemoteEndPoint.Port; }
	public override string GetLocalAddress () { return ctx.Request.LocalEndPoint.Address.ToString (); }
	public override int GetLocalPort () { return ctx.Request.LocalEndPoint.Port; }
	public override string GetServerName () { return ctx.Request.Url.Host; }
	public override string GetFilePathTranslated () { return MapPath (path); }

	public override string GetKnownRequestHeader (int index)
	{
		return ctx.Request.Headers [GetKnownRequestHeaderName (index)];
	}

	public override string GetUnknownRequestHeader (string name)
	{
		return ctx.Request.Headers [name];
	}

	public override string[][] GetUnknownRequestHeaders ()
	{
		List<string[]> r = new List<string[]> ();
		foreach (string k in ctx.Request.Headers.AllKeys)
			if (GetKnownRequestHeaderIndex (k) < 0)
				r.Add (new string[] { k, ctx.Request.Headers [k] });
		return r.ToArray ();
	}

	public override void SendStatus (int code, string text) { status = code; statusText = text; }

	public override void SendKnownResponseHeader (int index, string value)
	{
		headers.Add (new KeyValuePair<string, string> (GetKnownResponseHeaderName (index), value));
	}

	public override void SendUnknownResponseHeader (string name, string value)
	{
		headers.Add (new KeyValuePair<string, string> (name, value));
	}

	public override void SendResponseFromMemory (byte[] data, int length) { body.Write (data, 0, length); }
	public override void FlushResponse (bool finalFlush) { }

	public override void EndOfRequest ()
	{
		if (ended)
			return;
		ended = true;
		HttpListenerResponse resp = ctx.Response;
		try {
			resp.StatusCode = status;
			resp.StatusDescription = statusText;
			foreach (KeyValuePair<string, string> h in headers) {
				switch (h.Key.ToLowerInvariant ()) {
				case "content-length": case "transfer-encoding": case "connection": case "keep-alive": case "server":
					continue; // the listener writes those itself
				case "content-type":
					resp.ContentType = h.Value;
					continue;
				}
				resp.Headers.Add (h.Key, h.Value);
			}
			resp.ContentLength64 = body.Length;
			resp.OutputStream.Write (body.GetBuffer (), 0, (int) body.Length);
		} catch (Exception e) {
			Console.Error.WriteLine ("MonoHost: " + e);
		} finally {
			resp.Close ();
		}
	}
}
