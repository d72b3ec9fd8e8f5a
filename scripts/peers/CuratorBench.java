// Apache Curator's InterProcessMutex under the same measurements as
// `clastor load`, for scripts/perf.sh. Prints one JSON line in the harness'
// format. Usage:
//   java CuratorBench <connect> uncontended|handoff <seconds> <warmup-seconds> <scenario>
// uncontended: one session, acquire+release of its own path, one sample each.
// handoff: two sessions on one path; the holder releases while the other
// waits; a sample is from the release call to the waiter's acquire returning.
import java.util.Arrays;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.TimeUnit;
import org.apache.curator.framework.CuratorFramework;
import org.apache.curator.framework.CuratorFrameworkFactory;
import org.apache.curator.framework.recipes.locks.InterProcessMutex;
import org.apache.curator.retry.RetryOneTime;

public class CuratorBench {
    static CuratorFramework connect(String hosts) throws Exception {
        CuratorFramework c = CuratorFrameworkFactory.newClient(hosts, 10000, 5000, new RetryOneTime(100));
        c.start();
        if (!c.blockUntilConnected(20, TimeUnit.SECONDS)) throw new IllegalStateException("not connected");
        return c;
    }

    public static void main(String[] args) throws Exception {
        String hosts = args[0], mode = args[1], scenario = args[4];
        long seconds = Long.parseLong(args[2]), warmup = Long.parseLong(args[3]);
        String path = "/clastor-perf/curator-" + mode + "-" + ProcessHandle.current().pid();
        long[] samples = new long[1 << 22];
        int n = 0;
        long errors = 0;
        long measuredFrom = 0, end = 0;
        if (mode.equals("uncontended")) {
            CuratorFramework c = connect(hosts);
            InterProcessMutex m = new InterProcessMutex(c, path);
            long start = System.nanoTime();
            measuredFrom = start + warmup * 1_000_000_000L;
            end = measuredFrom + seconds * 1_000_000_000L;
            for (long now = start; now < end; now = System.nanoTime()) {
                long t0 = System.nanoTime();
                if (!m.acquire(30, TimeUnit.SECONDS)) { errors++; continue; }
                m.release();
                long t1 = System.nanoTime();
                if (t0 >= measuredFrom && n < samples.length) samples[n++] = (t1 - t0) / 1000;
            }
            c.close();
        } else {
            CuratorFramework[] cs = { connect(hosts), connect(hosts) };
            InterProcessMutex[] ms = { new InterProcessMutex(cs[0], path), new InterProcessMutex(cs[1], path) };
            // InterProcessMutex must be released by the thread that acquired it.
            ExecutorService[] ex = { Executors.newSingleThreadExecutor(), Executors.newSingleThreadExecutor() };
            int holder = 0;
            final InterProcessMutex first = ms[0];
            ex[0].submit(() -> { first.acquire(); return null; }).get();
            long start = System.nanoTime();
            measuredFrom = start + warmup * 1_000_000_000L;
            end = measuredFrom + seconds * 1_000_000_000L;
            while (System.nanoTime() < end) {
                final InterProcessMutex w = ms[1 - holder], h = ms[holder];
                Future<Long> granted = ex[1 - holder].submit(() -> {
                    if (!w.acquire(30, TimeUnit.SECONDS)) return -1L;
                    return System.nanoTime();
                });
                Thread.sleep(5); // let the waiter queue, as `clastor load --op handoff` does
                long t0 = System.nanoTime();
                ex[holder].submit(() -> { h.release(); return null; }).get();
                long t1 = granted.get();
                if (t1 < 0) { errors++; break; }
                if (t0 >= measuredFrom && n < samples.length) samples[n++] = (t1 - t0) / 1000;
                holder = 1 - holder;
            }
            final InterProcessMutex last = ms[holder];
            ex[holder].submit(() -> { last.release(); return null; }).get();
            ex[0].shutdown();
            ex[1].shutdown();
            cs[0].close();
            cs[1].close();
        }
        long[] s = Arrays.copyOf(samples, n);
        Arrays.sort(s);
        double secs = (end - measuredFrom) / 1e9;
        System.out.printf("{\"name\":\"Curator InterProcessMutex %s\",\"series\":\"Curator InterProcessMutex\","
                + "\"scenario\":\"%s\",\"connections\":%d,\"depth\":1,\"ops\":%d,\"ops_per_s\":%d,\"errors\":%d,"
                + "\"p50_us\":%d,\"p90_us\":%d,\"p99_us\":%d,\"p999_us\":%d,\"max_us\":%d}%n",
                mode, scenario, mode.equals("handoff") ? 2 : 1, n, Math.round(n / secs), errors,
                q(s, 0.5), q(s, 0.9), q(s, 0.99), q(s, 0.999), n == 0 ? 0 : s[n - 1]);
    }

    static long q(long[] s, double p) {
        if (s.length == 0) return 0;
        return s[Math.min(s.length - 1, (int) Math.floor(p * s.length))];
    }
}
