# A perl script that loads several modules: an interpreter found through
# the script's #! line, then many small module files.
image_perl() {
    desc='Debian bookworm minbase + perl + a #! script, config Cmd ["bash"]'
    cmd='["bash"]'
    layers=(
        "apt-get install -y --no-install-recommends perl"
        "host:perl_script"
    )
    same_layers=
    profile=perl
}
perl_script() { # layer-dir
    mkdir -p "$1/usr/local/bin"
    cat >"$1/usr/local/bin/report" <<'PERL'
#!/usr/bin/perl
# Summarize the modules this script loaded, as a build report would.
use strict;
use warnings;
use Data::Dumper;
use Digest::SHA qw(sha256_hex);
use Encode qw(encode);
use File::Find;
use File::Temp qw(tempfile);
use Getopt::Long;
use JSON::PP;
use List::Util qw(max sum);
use POSIX qw(floor);
use Storable qw(dclone);
use Text::Wrap qw(wrap);
use Time::Local qw(timegm);

my @modules = sort keys %INC;
my $json = JSON::PP->new->canonical->encode(dclone({ modules => \@modules, epoch => timegm(0, 0, 0, 1, 0, 2024) }));
local $Data::Dumper::Terse = 1;
my ($fh, $tmp) = tempfile(UNLINK => 1);
print $fh Dumper(\@modules);
close $fh;
printf "perl ok %d modules %d %s\n", scalar(@modules), -s $tmp, substr(sha256_hex(encode("UTF-8", $json)), 0, 12);
PERL
    chmod 755 "$1/usr/local/bin/report"
}
workload_perl() {
    image=perl bound=1 expect='^perl ok [0-9]+ modules [0-9]+ [0-9a-f]{12}$'
    argv=(/usr/local/bin/report)
    what="\`/usr/local/bin/report\`, a #! perl script using 13 modules (JSON::PP, Digest::SHA, POSIX, Storable, File::Find...)"
}
