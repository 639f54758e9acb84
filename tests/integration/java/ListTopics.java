// Kafka's own Java client, configured only by a properties file (what
// `capledger dev client-config` prints): lists the topics the principal may see.
// Run as a single-file source program: java -cp '<kafka libs>/*' ListTopics.java FILE
import java.io.FileInputStream;
import java.util.Properties;
import java.util.concurrent.TimeUnit;
import org.apache.kafka.clients.admin.Admin;

public class ListTopics {
    public static void main(String[] args) throws Exception {
        Properties props = new Properties();
        try (FileInputStream in = new FileInputStream(args[0])) {
            props.load(in);
        }
        props.put("default.api.timeout.ms", "30000");
        try (Admin admin = Admin.create(props)) {
            int count = admin.listTopics().names().get(30, TimeUnit.SECONDS).size();
            System.out.println("topics " + count);
        }
    }
}
