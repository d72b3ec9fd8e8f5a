// A real Apache Curator InterProcessReadWriteLock, driven line by line over
// stdin, for tests/zookeeper_interop.rs: Clastor's read-write layout and
// Curator's read-write lock must exclude each other on the same lock path.
// Commands: `read <ms>` / `write <ms>` (answer ACQUIRED or TIMEOUT),
// `unread` / `unwrite` (RELEASED), `quit`. Taking `read` while holding
// `write`, then `unwrite`, is Curator's documented downgrade.
// `hammer <n> <hold_ms> <seed>` takes the lock n times, reading or writing at
// random, holding each grant hold_ms, and prints `HOLD R|W <from> <to>`
// (wall-clock ns, read after the grant and before the release: inside the
// true hold) per grant, then DONE. Prints READY once connected.
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.time.Instant;
import java.util.Random;
import java.util.concurrent.TimeUnit;
import org.apache.curator.framework.CuratorFramework;
import org.apache.curator.framework.CuratorFrameworkFactory;
import org.apache.curator.framework.recipes.locks.InterProcessMutex;
import org.apache.curator.framework.recipes.locks.InterProcessReadWriteLock;
import org.apache.curator.retry.RetryOneTime;

public class CuratorRwLock {
    public static void main(String[] args) throws Exception {
        CuratorFramework client = CuratorFrameworkFactory.newClient(args[0], 10000, 5000, new RetryOneTime(100));
        client.start();
        if (!client.blockUntilConnected(20, TimeUnit.SECONDS)) {
            System.out.println("ERROR not connected");
            return;
        }
        InterProcessReadWriteLock lock = new InterProcessReadWriteLock(client, args[1]);
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in));
        System.out.println("READY");
        System.out.flush();
        String line;
        while ((line = in.readLine()) != null) {
            String[] words = line.trim().split(" ");
            InterProcessMutex m = words[0].endsWith("read") ? lock.readLock() : lock.writeLock();
            switch (words[0]) {
                case "read":
                case "write":
                    boolean ok = m.acquire(Long.parseLong(words[1]), TimeUnit.MILLISECONDS);
                    System.out.println(ok ? "ACQUIRED" : "TIMEOUT");
                    break;
                case "unread":
                case "unwrite":
                    m.release();
                    System.out.println("RELEASED");
                    break;
                case "hammer":
                    hammer(lock, Integer.parseInt(words[1]), Long.parseLong(words[2]), Long.parseLong(words[3]));
                    break;
                case "quit":
                    client.close();
                    return;
                default:
                    System.out.println("ERROR unknown command " + words[0]);
            }
            System.out.flush();
        }
        client.close();
    }

    static long wallNanos() {
        Instant now = Instant.now();
        return now.getEpochSecond() * 1_000_000_000L + now.getNano();
    }

    static void hammer(InterProcessReadWriteLock lock, int n, long holdMs, long seed) throws Exception {
        Random random = new Random(seed);
        for (int i = 0; i < n; i++) {
            boolean write = random.nextBoolean();
            InterProcessMutex m = write ? lock.writeLock() : lock.readLock();
            if (!m.acquire(30, TimeUnit.SECONDS)) {
                System.out.println("ERROR not acquired within 30 s");
                return;
            }
            long from = wallNanos();
            Thread.sleep(holdMs);
            long to = wallNanos();
            m.release();
            System.out.println("HOLD " + (write ? "W" : "R") + " " + from + " " + to);
        }
        System.out.println("DONE");
    }
}
