// A real Apache Curator InterProcessReadWriteLock, driven line by line over
// stdin, for tests/zookeeper_interop.rs: Clastor's read-write layout and
// Curator's read-write lock must exclude each other on the same lock path.
// Commands: `read <ms>` / `write <ms>` (answer ACQUIRED or TIMEOUT),
// `unread` / `unwrite` (RELEASED), `quit`. Taking `read` while holding
// `write`, then `unwrite`, is Curator's documented downgrade. Prints READY
// once connected.
import java.io.BufferedReader;
import java.io.InputStreamReader;
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
}
