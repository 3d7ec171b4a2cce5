# Chapter 10's CPU benchmark: block-sparse attention time against the density of the block pattern.
# Data: bench_block_sparse/block_sparse.csv (header line "# machine: ..."); columns family, local, global,
# stride, density, pairs, flops, seconds.
load 'style.gp'

data = datadir.'/bench_block_sparse/block_sparse.csv'
machine = system("sed -n 's/^# machine: //p' '".data."'")
size = system("sed -n 's/^# seq_len \\([0-9]*\\), block \\([0-9]*\\), head_dim \\([0-9]*\\).*/T = \\1, B = \\2, d = \\3/p' '".data."'")
set datafile separator ','
set title sprintf("Block-sparse attention on the CPU: time against density\n{/*0.8 %s, one head, %s, one thread}", machine, size)
set xlabel 'density (visited blocks / causal blocks)'
set ylabel 'time (ms)'
set y2label 'GFLOP'
set xrange [0 : 1.05]
set yrange [0 : *]
set y2range [0 : *]
set ytics nomirror
set y2tics
set key top left font ',11'
family(name, col) = strcol(1) eq name ? column(col) : NaN
plot data using (family('local', 5)) : ($8 * 1e3) with points linetype 1 pointsize 1.3 title 'local', \
     data using (family('local+global', 5)) : ($8 * 1e3) with points linetype 2 pointsize 1.3 title 'local + global', \
     data using (family('strided', 5)) : ($8 * 1e3) with points linetype 3 pointsize 1.3 title 'strided', \
     data using (family('bigbird-like', 5)) : ($8 * 1e3) with points linetype 4 pointsize 1.5 title 'local + global + strided', \
     data using (family('dense', 5)) : ($8 * 1e3) with points linetype 5 pointsize 1.5 title 'dense causal', \
     data using 5 : ($7 / 1e9) axes x1y2 with points pointtype 6 pointsize 1.6 linecolor rgb '#4d4d4d' title 'FLOPs (right axis)'
