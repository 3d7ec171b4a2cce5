# Chapter 13: recall of n key -> value pairs read back by softmax attention and by linear attention's d x d
# state (identity keys, SiLU keys as MiniMax's layer has them, and with a MiniMax decay).
# Data: 13_minimax_lightning_attention/recall.dat (first line "# d = ..., ..."), columns pairs softmax linear
# "linear SiLU" "linear decay".
load 'style.gp'

data = datadir.'/13_minimax_lightning_attention/recall.dat'
d = system("sed -n 's/^# d = \\([0-9]*\\),.*/\\1/p' '".data."'") + 0
set title sprintf("Associative recall against the number of pairs (d = %d)", d)
set xlabel 'key -> value pairs n'
set ylabel 'recall (share of queries answered right)'
set logscale x 2
set xtics (4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
set yrange [0 : 1.05]
set key bottom left font ',11'
set arrow from d, graph 0 to d, graph 1 nohead dashtype 3 linecolor rgb '#4d4d4d'
set label sprintf('n = d = %d', d) at d, graph 0.6 right offset -0.5, 0 font ',10' textcolor rgb '#4d4d4d'
plot data using 1 : 2 with linespoints linetype 1 title 'softmax attention (all keys kept)', \
     data using 1 : 3 with linespoints linetype 2 title 'linear: state d x d', \
     data using 1 : 4 with linespoints linetype 3 title 'linear, SiLU keys (MiniMax)', \
     data using 1 : 5 with linespoints linetype 4 title 'linear with a MiniMax decay'
