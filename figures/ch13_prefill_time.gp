# Chapter 13's CPU benchmark: the prefill time of decayed linear attention against the prompt length, in the
# quadratic masked form, the blocked (lightning) form and the token-by-token recurrence.
# Data: bench_linear_prefill/linear_prefill.csv (header lines "# machine: ...", "# head_dim ..., block ...");
# columns seq_len, quadratic_s, blocked_s, recurrent_s.
load 'style.gp'

data = datadir.'/bench_linear_prefill/linear_prefill.csv'
machine = system("sed -n 's/^# machine: //p' '".data."'")
size = system("sed -n 's/^# head_dim \\([0-9]*\\), block \\([0-9]*\\).*/d = \\1, B = \\2/p' '".data."'")
set datafile separator ','
set title sprintf("Linear-attention prefill on the CPU: time against length\n{/*0.8 %s, one head, %s, float32, one thread}", machine, size)
set xlabel 'prompt length T (tokens)'
set ylabel 'time (ms)'
set logscale xy 2
set format x '%g'
set xrange [200 : *]
set offsets 0, graph 0.04, 0, 0
set xtics (256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
set ytics ('0.25' 0.25, '1' 1, '4' 4, '16' 16, '64' 64, '256' 256, '1024' 1024, '4096' 4096)
set key top left font ',11'
plot data using 1 : ($2 * 1e3) with linespoints linetype 2 title 'quadratic (masked form, O(T^2 d))', \
     data using 1 : ($3 * 1e3) with linespoints linetype 1 title 'blocked (lightning, O(T B d + T d^2))', \
     data using 1 : ($4 * 1e3) with linespoints linetype 3 title 'recurrent (token by token, O(T d^2))'
