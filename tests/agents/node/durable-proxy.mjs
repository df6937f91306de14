// docs/cli.md's preload for a Node older than 22.21 / 24.5, whose fetch ignores HTTPS_PROXY:
// undici's EnvHttpProxyAgent reads the proxy variables `durable run` sets.
import { EnvHttpProxyAgent, setGlobalDispatcher } from "undici";
setGlobalDispatcher(new EnvHttpProxyAgent());
