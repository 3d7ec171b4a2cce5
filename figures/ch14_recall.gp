# Chapter 14: associative recall at one d x d state. Left: n keys written once, every key asked, against n.
# Middle: at the longest sweep, recall against the key's age (writes since). Right: every key written twice
# (a new value after all the first writes), answered right only with the new value.
# Data: 14_delta_rule/recall.dat ("# d = ..., ..." then "keys softmax linear lin_decay delta gated_delta" and the
# same five for the update task) and recall_age.dat ("# n = ..." then "age softmax linear lin_decay delta
# gated_delta").
load 'style.gp'

data = datadir.'/14_delta_rule/recall.dat'
ages = datadir.'/14_delta_rule/recall_age.dat'
d = system("sed -n 's/^# d = \\([0-9]*\\),.*/\\1/p' '".data."'") + 0
n = system("sed -n 's/^# n = \\([0-9]*\\) .*/\\1/p' '".ages."'") + 0
set terminal svg enhanced size 1080, 420 font 'sans-serif,12' background rgb 'white'
set output outfile
set multiplot layout 1, 3 title sprintf("Associative recall at one state of d x d (d = %d)", d) font 'sans-serif,15'
set yrange [0 : 1.05]
set ylabel 'share of keys answered right'
set key bottom left font ',10'
set title 'keys written once' font 'sans-serif,13'
set logscale x 2
set xlabel 'keys n'
set xtics (4, 16, 64, 256, 1024, 4096)
set arrow 1 from d, graph 0 to d, graph 1 nohead dashtype 3 linecolor rgb '#4d4d4d'
plot data using 1 : 2 with linespoints linetype 1 title 'softmax (every key kept)', \
     data using 1 : 3 with linespoints linetype 2 title 'linear attention', \
     data using 1 : 4 with lines linetype 2 dashtype 2 title 'linear, decayed', \
     data using 1 : 5 with linespoints linetype 3 title 'delta rule', \
     data using 1 : 6 with lines linetype 3 dashtype 2 title 'gated delta rule'
set title sprintf('by age, n = %d', n) font 'sans-serif,13'
set xlabel 'writes since the key (age)'
set xtics auto
unset key
plot ages using 1 : 2 with lines linetype 1, \
     ages using 1 : 3 with lines linetype 2, \
     ages using 1 : 4 with lines linetype 2 dashtype 2, \
     ages using 1 : 5 with lines linetype 3, \
     ages using 1 : 6 with lines linetype 3 dashtype 2
set title 'every key written twice' font 'sans-serif,13'
set xlabel 'keys n (2n writes)'
set xtics (4, 16, 64, 256, 1024, 4096)
plot data using 1 : 7 with linespoints linetype 1, \
     data using 1 : 8 with linespoints linetype 2, \
     data using 1 : 9 with lines linetype 2 dashtype 2, \
     data using 1 : 10 with linespoints linetype 3, \
     data using 1 : 11 with lines linetype 3 dashtype 2
unset multiplot
