# A JVM start: java -jar of a tiny jar built at image build time (javac in a
# build stage that is not part of the image). libjvm.so and the module
# image lib/modules are read at random offsets.
image_java() {
    desc='Debian bookworm minbase + openjdk-17-jre-headless + a jar, config Cmd ["bash"]'
    cmd='["bash"]'
    layers=(
        "apt-get install -y --no-install-recommends openjdk-17-jre-headless"
        "host:java_jar"
    )
    same_layers=
    profile=java
}
java_jar() { # layer-dir image-dir lowerdirs
    local out=$1 dir=$2 lower=$3
    # the build stage: the JDK over the image's layers, then javac and jar
    if [[ ! -f $dir/jdk.done ]]; then
        chroot_step "$dir/jdk" "$lower" "apt-get install -y --no-install-recommends openjdk-17-jdk-headless" || return 1
        touch "$dir/jdk.done"
    fi
    mkdir -p "$dir/jdk/build"
    cat >"$dir/jdk/build/Hello.java" <<'JAVA'
import java.net.URI;
import java.nio.charset.StandardCharsets;
import java.security.MessageDigest;
import java.time.Duration;
import java.time.LocalDate;
import java.util.Map;
import java.util.TreeMap;
import java.util.regex.Matcher;
import java.util.regex.Pattern;
import java.util.stream.Collectors;

public class Hello {
    public static void main(String[] args) throws Exception {
        Map<String, Integer> counts = new TreeMap<>();
        for (String w : "the quick brown fox jumps over the lazy dog".split(" ")) {
            counts.merge(w, 1, Integer::sum);
        }
        String joined = counts.entrySet().stream()
                .map(e -> e.getKey() + "=" + e.getValue())
                .collect(Collectors.joining(","));
        Matcher m = Pattern.compile("(\\w+)=2").matcher(joined);
        String twice = m.find() ? m.group(1) : "none";
        byte[] d = MessageDigest.getInstance("SHA-256").digest(joined.getBytes(StandardCharsets.UTF_8));
        String host = URI.create("https://example.org/a?b=c").getHost();
        long days = Duration.between(LocalDate.of(2024, 1, 1).atStartOfDay(),
                LocalDate.of(2024, 3, 1).atStartOfDay()).toDays();
        System.out.printf("java ok %s %s %d %02x%02x%n", twice, host, days, d[0], d[1]);
    }
}
JAVA
    chroot_step "$dir/jar" "$dir/jdk:$lower" \
        "cd /build && rm -rf classes && javac -d classes Hello.java && jar --create --file hello.jar --main-class Hello -C classes ." || return 1
    mkdir -p "$out/app"
    cp "$dir/jar/build/hello.jar" "$out/app/hello.jar"
}
workload_java() {
    image=java bound=1 expect='^java ok the example.org 60 [0-9a-f]{4}$'
    argv=(java -jar /app/hello.jar)
    what="\`java -jar /app/hello.jar\` (a JVM start: streams, lambdas, regex, SHA-256, java.time)"
}
