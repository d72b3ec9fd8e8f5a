// A real Apache Curator InterProcessMutex, driven line by line over stdin, for
// tests/zookeeper_curator.rs: Clastor and Curator must exclude each other on
// the same lock path. Commands: `acquire <ms>` (answers ACQUIRED or TIMEOUT),
// `release` (RELEASED), `quit`. Prints READY once connected.
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.util.concurrent.TimeUnit;
import org.apache.curator.framework.CuratorFramework;
import org.apache.curator.framework.CuratorFrameworkFactory;
import org.apache.curator.framework.recipes.locks.InterProcessMutex;
import org.apache.curator.retry.RetryOneTime;

public class CuratorMutex {
    public static void main(String[] args) throws Exception {
        CuratorFramework client = CuratorFrameworkFactory.newClient(args[0], 10000, 5000, new RetryOneTime(100));
        client.start();
        if (!client.blockUntilConnected(20, TimeUnit.SECONDS)) {
            System.out.println("ERROR not connected");
            return;
        }
        InterProcessMutex mutex = new InterProcessMutex(client, args[1]);
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in));
        System.out.println("READY");
        System.out.flush();
        String line;
        while ((line = in.readLine()) != null) {
            String[] words = line.trim().split(" ");
            switch (words[0]) {
                case "acquire":
                    boolean ok = mutex.acquire(Long.parseLong(words[1]), TimeUnit.MILLISECONDS);
                    System.out.println(ok ? "ACQUIRED" : "TIMEOUT");
                    break;
                case "release":
                    mutex.release();
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
