// A platform's SFTP push, as a Java platform built on JSch does it: JSch's default algorithms,
// the relay's host key pinned through a known_hosts file, then a few SFTP commands.
//
// java -cp jsch.jar:. JschPush HOST PORT USER KNOWN_HOSTS AUTH [--config KEY=VALUE]... COMMAND...
//   AUTH     password:SECRET or key:PATH (a private key in PEM form)
//   COMMAND  put LOCAL REMOTE | rename FROM TO | cd DIR | mkdir DIR
// Prints "hostkey TYPE MD5-FINGERPRINT" (what a JSch user is shown), then "ok COMMAND" per command.
// Exit 0 when every command succeeded; 3 and "sftp-error id=N MESSAGE" when the server refused
// one; 4 and "jsch-error MESSAGE" when the session could not be set up.
import com.jcraft.jsch.ChannelSftp;
import com.jcraft.jsch.JSch;
import com.jcraft.jsch.JSchException;
import com.jcraft.jsch.Session;
import com.jcraft.jsch.SftpException;
import java.util.Arrays;
import java.util.List;

public class JschPush {
    public static void main(String[] args) {
        String host = args[0];
        int port = Integer.parseInt(args[1]);
        String user = args[2];
        String knownHosts = args[3];
        String auth = args[4];
        int i = 5;
        JSch jsch = new JSch();
        Session session = null;
        try {
            jsch.setKnownHosts(knownHosts);
            if (auth.startsWith("key:")) {
                jsch.addIdentity(auth.substring(4));
            }
            session = jsch.getSession(user, host, port);
            if (auth.startsWith("password:")) {
                session.setPassword(auth.substring(9));
                session.setConfig("PreferredAuthentications", "password");
            } else {
                session.setConfig("PreferredAuthentications", "publickey");
            }
            while (i + 1 < args.length && args[i].equals("--config")) {
                String[] kv = args[i + 1].split("=", 2);
                session.setConfig(kv[0], kv[1]);
                i += 2;
            }
            session.connect(15000);
            System.out.println("hostkey " + session.getHostKey().getType() + " "
                    + session.getHostKey().getFingerPrint(jsch));
            ChannelSftp sftp = (ChannelSftp) session.openChannel("sftp");
            sftp.connect(15000);
            List<String> rest = Arrays.asList(args).subList(i, args.length);
            for (int c = 0; c < rest.size(); ) {
                String command = rest.get(c);
                switch (command) {
                    case "put":
                        sftp.put(rest.get(c + 1), rest.get(c + 2));
                        c += 3;
                        break;
                    case "rename":
                        sftp.rename(rest.get(c + 1), rest.get(c + 2));
                        c += 3;
                        break;
                    case "cd":
                        sftp.cd(rest.get(c + 1));
                        c += 2;
                        break;
                    case "mkdir":
                        sftp.mkdir(rest.get(c + 1));
                        c += 2;
                        break;
                    default:
                        throw new IllegalArgumentException("unknown command " + command);
                }
                System.out.println("ok " + command);
            }
            sftp.disconnect();
        } catch (SftpException e) {
            System.out.println("sftp-error id=" + e.id + " " + e.getMessage());
            System.exit(3);
        } catch (JSchException e) {
            System.out.println("jsch-error " + e.getMessage());
            System.exit(4);
        } finally {
            if (session != null) {
                session.disconnect();
            }
        }
        System.exit(0);
    }
}
