#!/usr/bin/env bash
# Dumps Debian's ncbi-rrna-data (NCBI rRNA BLAST databases, about 434,000 records, 705 MB of FASTA)
# into DIR/*.fasta for bench/bench_prepare.py. Needs apt-get (for the download only, no root
# install: the packages are unpacked with dpkg -x into DIR/debs) and a machine that reaches Debian's
# mirrors. Usage: bash bench/get_rrna_corpus.sh [DIR]   (default /tmp/rrna-corpus)
set -euo pipefail
DIR=${1:-/tmp/rrna-corpus}
mkdir -p "$DIR/debs"
cd "$DIR/debs"
# ncbi-blast+ for blastdbcmd; the libraries it links that a slim image may lack.
apt-get download ncbi-rrna-data ncbi-blast+ liblmdb0 libmbedtls14 libmbedcrypto7 libmbedx509-1 >/dev/null
for deb in *.deb; do dpkg -x "$deb" root; done
export LD_LIBRARY_PATH="$PWD/root/usr/lib/ncbi-blast+:$PWD/root/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
DATA="$PWD/root/usr/share/ncbi/data"
# Combined16SrRNA (bacterial and archaeal 16S), SSURef_93 and LSURef_93 (SILVA 93 small and large
# subunit): the three databases with distinct records (the others are subsets of these).
for db in Combined16SrRNA SSURef_93.fasta LSURef_93.fasta; do
  root/usr/bin/blastdbcmd -db "$DATA/$db" -entry all -line_length 80 > "$DIR/${db%.fasta}.fasta"
done
ls -l "$DIR"/*.fasta
grep -c '^>' "$DIR"/*.fasta
