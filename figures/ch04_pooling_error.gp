# Chapter 04: output error of converting an MHA layer to G KV heads by mean-pooling, without retraining,
# for key/value heads that differ by `spread` around a shared part.
# Data: 04_grouped_query_attention/pooling_error.dat, "G error_spread1 error_spread2 ...".
load 'style.gp'

data = datadir.'/04_grouped_query_attention/pooling_error.dat'
stats data using 1 nooutput
H = int(STATS_max)
set title 'Mean-pooling MHA into G KV heads: relative output error'
set xlabel sprintf('KV heads G (H = %d query heads)', H)
set ylabel 'relative error of the layer output'
set logscale x 2
set xrange [0.8 : H * 1.25]
set xtics 1, 2
set yrange [0 : 1.05]
set key top right
plot for [c = 2 : 4] data using 1 : c with linespoints linetype c - 1 \
     title sprintf('spread %s', word('0.3 1.0 3.0', c - 1))
