# Chapter 01: the causal softmax weights of one head, as a T x T heatmap.
# Data: 01_attention_core/attention_weights.dat, lines "query_index key_index weight", one block per query.
load 'style.gp'

data = datadir.'/01_attention_core/attention_weights.dat'
stats data using 1 nooutput
T = int(STATS_max) + 1

set title sprintf('Causal attention weights of one head (T = %d tokens)', T)
set xlabel 'key position j (token)'
set ylabel 'query position i (token)'
set cblabel 'attention weight'
set size ratio -1
set xrange [-0.5 : T - 0.5]
set yrange [T - 0.5 : -0.5]
step = T <= 10 ? 1 : T / 8
set xtics 0, step
set ytics 0, step
set cbrange [0 : *]
set tics front
set grid noxtics noytics
set border 15
unset key

# Keys after the query (j > i) are masked: they are left out of the image and the frame's fill shows.
set object 1 rectangle from graph 0, 0 to graph 1, 1 behind fillcolor rgb masked_colour fillstyle solid noborder
set label 1 'masked (j > i)' at graph 0.97, graph 0.93 right front textcolor rgb '#4d4d4d'

plot data using 2 : 1 : ($2 > $1 ? NaN : $3) with image pixels
