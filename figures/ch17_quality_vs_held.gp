# Chapter 17: what each cache policy costs in quality (KL divergence of the next-token distribution from the
# float32 cache's) against the bytes the cache holds per sequence at the scored positions, all layers of
# SmolLM2-135M-Instruct; the Pareto front drawn. Data: the committed full sweep,
# chapters/17_what_cache_tricks_cost/results/{quality,fronts}.csv, read from figures/.
load 'style.gp'
if (!exists("dir")) dir = '../chapters/17_what_cache_tricks_cost/results'
quality = dir.'/quality.csv'
fronts = dir.'/fronts.csv'
set datafile separator ','
set title 'Quality against bytes held per sequence (SmolLM2-135M, Python tutorial)'
set xlabel 'bytes held, all 30 layers (K, V, scales, page bounds, scores)'
set ylabel 'KL from the float32 cache (nats per token)'
set logscale xy
set format x '%h'
set xtics ('256 KiB' 2**18, '512 KiB' 2**19, '1 MiB' 2**20, '2 MiB' 2**21, '4 MiB' 2**22, '8 MiB' 2**23, '16 MiB' 2**24)
set format y '10^{%L}'
set key bottom left font ',10'
sel(s, v) = column(4) == s ? v : NaN
plot fronts using (strcol(1) eq 'held' ? $3 : NaN) : 4 with lines linecolor rgb '#999999' dashtype 2 title 'Pareto front', \
     quality using (column(4) == 0 && column(3) > 0 ? column(6) : NaN) : 10 with points linetype 1 title 'quantized (bf16, int8, fp8, int4, int2)', \
     quality using (sel(1, column(6))) : 10 with linespoints linetype 2 title 'window', \
     quality using (column(4) == 2 && strcol(1) eq 'sinks 4' ? column(6) : NaN) : 10 with linespoints linetype 3 title 'sinks 4 + window', \
     quality using (sel(3, column(6))) : 10 with linespoints linetype 4 title 'exact top-k (holds everything)', \
     quality using (sel(4, column(6))) : 10 with linespoints linetype 5 title 'Quest, pages of 16', \
     quality using (sel(5, column(6))) : 10 with linespoints linetype 6 title 'H2O'
