# Chapter 04: which KV head each query head reads, for MHA (G = H), GQA and MQA (G = 1).
# Data: 04_grouped_query_attention/head_mapping.dat, blocks "q_head kv_head G H" (index 0 MHA, 1 GQA, 2 MQA).
load 'style.gp'

data = datadir.'/04_grouped_query_attention/head_mapping.dat'
stats data using 4 nooutput
H = int(STATS_max)
array G[3]
do for [i = 0 : 2] { stats data index i using 3 nooutput; G[i + 1] = int(STATS_max) }

set terminal svg enhanced size 900, 300 font 'sans-serif,12' background rgb 'white'
set output outfile
set multiplot layout 1, 3 margins 0.04, 0.98, 0.08, 0.7 spacing 0.04 title 'Query head → KV head' font 'sans-serif,15'
unset border
unset tics
unset grid
unset key
set xrange [-0.8 : H - 0.2]
set yrange [-0.35 : 1.35]
# KV head g sits under the middle of its group of H/G query heads.
kv_x(g, G) = g * (H / G) + (H / G - 1) / 2.0
titles = 'MHA GQA MQA'
do for [i = 0 : 2] {
  g_count = G[i + 1]
  set title sprintf('%s: H = %d, G = %d', word(titles, i + 1), H, g_count)
  set label 1 'query heads' at graph 0.5, graph 0.98 center textcolor rgb '#4d4d4d' font ',11'
  set label 2 'KV heads (cached)' at graph 0.5, graph 0.02 center textcolor rgb '#4d4d4d' font ',11'
  plot data index i using 1 : (1) : (kv_x($2, g_count) - $1) : (-1) with vectors nohead linecolor rgb '#9e9e9e' linewidth 1.2, \
       data index i using 1 : (1) with points pointtype 7 pointsize 1.4 linecolor 1, \
       data index i using (kv_x($2, g_count)) : (0) with points pointtype 5 pointsize 1.8 linecolor 2
}
unset multiplot
